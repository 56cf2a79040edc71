"""The README's two-regime figure: in-domain gain and KL on general prompts of each method at its chosen learning rate,
study 1 (no answer-format instruction, 8 steps) beside study 2 (the paper's regime), from the committed reports.

Each study's ``results.json`` (written by `trl-onpolicy compare`) holds per (method, rate) the mean over seeds and a
95% t-interval over seeds. Each method is shown at the rate its report chose: on the DEV split when the study has one,
else (study 1) the highest in-domain gain, i.e. chosen on the test set, which flatters every method alike (said on
the figure).

    python scripts/plot_regimes.py --studies studies/smollm2_cpu studies/smollm2_study2 --out docs/two_regimes.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ORDER = ["sft", "eaft", "dft", "idft", "idft_v1", "idft_hinted", "idft_online", "sft_online", "dpo", "simpo", "sdft"]


def chosen_groups(results: dict) -> tuple[list[dict], str]:
    """Each label's group (per-rate summary) at the rate its report chose (`trl_onpolicy.compare.selection.best_by_label`:
    DEV accuracy when the study has a DEV split, else in-domain gain), in `ORDER`; and how the rate was chosen."""
    from trl_onpolicy.compare.selection import best_by_label, selected_on_dev

    groups = [g for g in results["groups"] if g["label"] != "base" and g["per_seed"]]
    out = {label: g for label, g in best_by_label(groups).items() if g["metrics"]["in_domain_acc"]["mean"] is not None}
    rule = "rate chosen on DEV" if selected_on_dev(groups) else "rate: best on the test set"
    return [out[k] for k in ORDER if k in out] + [g for k, g in out.items() if k not in ORDER], rule


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", nargs="+", required=True, help="study folders, each with a results.json")
    parser.add_argument("--titles", nargs="*", default=None, help="one panel title per study (default: its title)")
    parser.add_argument("--out", required=True, help="the PNG to write")
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from trl_onpolicy.compare.report import error_bar

    studies = []
    for folder in args.studies:
        path = Path(folder) / "results.json"
        if not path.is_file():
            raise SystemExit(f"--studies {folder}: no results.json there; run `trl-onpolicy compare --report_only true` first")
        studies.append(json.loads(path.read_text()))
    titles = args.titles or [s["config"].get("title") or f for s, f in zip(studies, args.studies)]
    if len(titles) != len(studies):
        raise SystemExit(f"--titles: {len(titles)} titles for {len(studies)} studies")

    fig, axes = plt.subplots(2, len(studies), figsize=(5.6 * len(studies), 7.5), squeeze=False)
    for col, (results, title) in enumerate(zip(studies, titles)):
        groups, rule = chosen_groups(results)
        labels = [f"{g['label']} ({float(g['learning_rate']):.0e}, {len(g['seeds'])} seeds)" for g in groups]
        y = list(range(len(groups)))[::-1]
        for row, (key, scale, xlabel) in enumerate([("in_domain_gain", 100, "in-domain gain vs base (points)"),
                                                     ("kl_general", 1, "KL(base‖model) on general prompts (nats/token)")]):
            ax = axes[row][col]
            bars = [error_bar(g["metrics"].get(key), scale) or (0.0, 0.0, 0.0) for g in groups]
            means, err = [b[0] for b in bars], [[b[1] for b in bars], [b[2] for b in bars]]
            colors = ["#c44e52" if g["label"].startswith("idft") else "#4c72b0" if g["label"] == "sft" else "#8c8c8c"
                      for g in groups]
            ax.barh(y, means, xerr=err, color=colors, capsize=3)
            ax.set_yticks(y, labels, fontsize=8)
            ax.axvline(0, color="black", linewidth=0.8)
            ax.set_xlabel(xlabel, fontsize=9)
            if row == 0:
                ax.set_title(f"{title}\n{rule}; mean, 95% t-interval over seeds", fontsize=8.5)
    for row in axes:  # one scale per row, so the studies compare at a glance
        lo, hi = min(ax.get_xlim()[0] for ax in row), max(ax.get_xlim()[1] for ax in row)
        for ax in row:
            ax.set_xlim(lo, hi)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
