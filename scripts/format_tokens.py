"""Why a token-weighted loss does or does not learn the answer format: per-unit format shares and the format tokens'
phi, gamma and weight, for a `trl-onpolicy compare` study.

Two measurements, written to ``<output_dir>/format_tokens.{md,json}`` of the study:

1. **Per unit, from the committed evaluations** (no model is run): for every finished unit, the share of in-domain
   answers that contain the answer marker (``####``) and the share cut off at ``max_new_tokens``; mean, min and max
   over seeds per (method, learning rate).
2. **Per token class of the training references**, under the base model and under re-trained units (``--retrain``):
   the reference tokens are split into the answer marker (the tokens that spell ``####``), the answer after it, the
   end-of-turn token, and the rest (the working); "hard" collects every token with p < 0.1 across classes. Per class:
   the mean probability p, the median phi = log p + H, the share of tokens whose IDFT gamma sits at ``gamma_max``,
   the mean per-token weight of DFT (p) and IDFT (p^gamma), also relative to the rest's, and the class's share of the
   summed loss weight under SFT (its token share), DFT and IDFT. The numbers come from the package's one phi computation
   (`trl_onpolicy.ddt.scoring.score_dataset`) and its one weight function (`trl_onpolicy.losses.token_weights`).
   A re-trained unit is trained exactly as compare trains it (same seed and settings); its training loss is printed
   beside the committed unit's so a reader can check it is the same model.

    python scripts/format_tokens.py --config recipes/compare/smollm2_study.yaml --retrain sft@1e-5 idft@1e-5
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

CLASSES = ("marker", "answer", "end", "rest", "hard")
HARD_P = 0.1  # "hard": every scored token (any class) the model gives p < HARD_P, the ones SFT learns most from


def unit_format_shares(comparison) -> list[dict]:
    """Per (label, learning rate): in-domain accuracy, marker share and cut-off share over the committed seeds."""
    from trl_onpolicy.compare.metrics import item_records
    from trl_onpolicy.compare.selection import role_items, role_shares

    sets = comparison.cfg.eval_sets
    names = [s.name for s in sets if s.role == "in_domain"]
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for unit in comparison.units():
        if comparison.finished(unit) is None:
            continue
        # read back from the unit's evaluation files: units written before compare recorded shares have none stored
        rec = item_records(comparison.unit_dir(unit) / "eval", names, comparison.answer_marker)
        items, shares = role_items(rec, sets, "in_domain"), role_shares(rec, sets, "in_domain")
        if not items or shares["marker"] is None:
            continue
        groups[(unit.spec.label, unit.lr)].append({"seed": unit.seed, "accuracy": float(np.mean(items)), **shares})
    rows = []
    for (label, lr), per_seed in groups.items():
        row = {"label": label, "lr": lr, "seeds": len(per_seed)}
        for k in ("accuracy", "marker", "cut_off"):
            vals = [p[k] for p in per_seed]
            row[k] = {"mean": float(np.mean(vals)), "min": float(min(vals)), "max": float(max(vals))}
        rows.append(row)
    return rows


def classify(token_ids, tokenizer, end_ids: set[int], marker: str) -> list[str]:
    """The class of each scored reference token: the tokens that spell ``marker``, the answer after it, the
    end-of-turn token(s), the rest."""
    pieces = [tokenizer.decode([int(t)]) for t in token_ids]
    text = "".join(pieces)
    start = text.rfind(marker)
    classes, pos = [], 0
    for tok, piece in zip(token_ids, pieces):
        lo, hi = pos, pos + len(piece)
        pos = hi
        if int(tok) in end_ids:
            classes.append("end")
        elif start >= 0 and lo < start + len(marker) and hi > start:
            classes.append("marker")
        elif start >= 0 and lo >= start + len(marker) and piece.strip():
            classes.append("answer")
        else:
            classes.append("rest")
    return classes


def token_class_stats(comparison, model, tokenizer, idft: dict) -> dict:
    """Per token class of the training references under ``model``: count, mean p, median phi, share at gamma_max,
    mean DFT and IDFT weights (and relative to the rest's)."""
    from trl_onpolicy.ddt.scoring import score_dataset
    from trl_onpolicy.losses import token_weights
    from trl_onpolicy.utils.generation import eos_token_ids

    result = score_dataset(model, tokenizer, comparison.sft_dataset(), max_length=comparison.cfg.budget.max_length,
                           progress=False)
    end_ids = set(eos_token_ids(model, tokenizer))
    cols: dict[str, dict[str, list]] = {c: defaultdict(list) for c in CLASSES}
    for arrays in result.tokens:
        if arrays is None:
            continue
        lp = torch.as_tensor(arrays["log_probs"], dtype=torch.float64)
        ent = torch.as_tensor(arrays["entropy"], dtype=torch.float64)
        w = token_weights("idft", lp, ent, beta=idft["beta"], gamma_min=idft["gamma_min"], gamma_max=idft["gamma_max"])
        for i, c in enumerate(classify(arrays["token_ids"], tokenizer, end_ids, comparison.answer_marker)):
            p = math.exp(float(lp[i]))
            for name in (c, "hard") if p < HARD_P else (c,):
                cols[name]["p"].append(p)
                cols[name]["phi"].append(float(w["phi"][i]))
                cols[name]["gamma"].append(float(w["gamma"][i]))
                cols[name]["w_idft"].append(float(w["weight"][i]))
    out = {}
    totals = {k: sum(sum(cols[c][k]) for c in CLASSES if c != "hard") for k in ("p", "w_idft")}
    total_n = sum(len(cols[c]["p"]) for c in CLASSES if c != "hard")
    means = {c: (float(np.mean(cols[c]["p"])), float(np.mean(cols[c]["w_idft"]))) for c in CLASSES if cols[c]["p"]}
    rest_dft, rest_idft = means.get("rest", (float("nan"), float("nan")))
    for c, (p_mean, w_idft) in means.items():
        col = cols[c]
        at_max = float(np.mean([g >= idft["gamma_max"] - 1e-9 for g in col["gamma"]]))
        out[c] = {"tokens": len(col["p"]), "p_mean": p_mean, "phi_median": float(np.median(col["phi"])),
                  "gamma_mean": float(np.mean(col["gamma"])), "share_gamma_max": at_max,
                  "w_dft": p_mean, "w_idft": w_idft, "w_dft_rel": p_mean / rest_dft, "w_idft_rel": w_idft / rest_idft,
                  "share_sft": len(col["p"]) / total_n, "share_dft": sum(col["p"]) / totals["p"],
                  "share_idft": sum(col["w_idft"]) / totals["w_idft"]}
    return out


def idft_settings(comparison) -> dict:
    """IDFT's beta and gamma clamps as the study trains its ``idft`` method (its recipe args over `IDFTConfig`'s
    defaults), for the weights of `token_class_stats`."""
    from trl_onpolicy.compare.units import Unit

    spec = next((s for s in comparison.cfg.method_specs if s.name == "idft" and s.label == "idft"), None)
    if spec is None:
        from trl_onpolicy.trainer.idft_config import IDFTConfig

        fields = IDFTConfig.__dataclass_fields__
        return {k: fields[f"idft_{k}"].default for k in ("beta", "gamma_min", "gamma_max")}
    config = comparison.trainer_config(Unit(spec, comparison.cfg.rates_of(spec)[0], 0))
    return {k: getattr(config, f"idft_{k}") for k in ("beta", "gamma_min", "gamma_max")}


def retrain(comparison, label: str, lr: float, seed: int):
    """The unit ``label@lr`` at ``seed``, trained as compare trains it; returns (model, tokenizer, stored, info)."""
    from trl_onpolicy.compare.units import Unit

    spec = next(s for s in comparison.cfg.method_specs if s.label == label)  # main checked the label
    unit = Unit(spec, lr, seed)
    model, tokenizer = comparison.load_base()
    torch.manual_seed(seed)
    info, model = comparison.train(unit, model, tokenizer)
    model = model.to(comparison.dtype).eval()
    return model, tokenizer, comparison.finished(unit), info


def markdown(title: str, shares: list[dict], classes: dict) -> str:
    pct = lambda d: f"{100 * d['mean']:.0f} ({100 * d['min']:.0f}-{100 * d['max']:.0f})"  # noqa: E731
    lines = [f"# Answer format: {title}", "", "Written by `scripts/format_tokens.py` (see its docstring).", "",
             "## Per unit, from the committed evaluations (in-domain sets)", "",
             "Mean over seeds (min-max over seeds), in %.", "",
             "| method | lr | seeds | accuracy | answers with the marker | answers cut off |", "|---|---|---|---|---|---|"]
    for r in shares:
        lr = "–" if r["lr"] is None else f"{r['lr']:g}"
        lines.append(f"| {r['label']} | {lr} | {r['seeds']} | {pct(r['accuracy'])} | {pct(r['marker'])} | {pct(r['cut_off'])} |")
    lines += ["", "## Token classes of the training references", "",
              "marker: the tokens that spell the answer marker; answer: the tokens after it; end: the end-of-turn token; "
              "rest: the working; hard: every token (of any class) with p < 0.1 under that model. p: mean probability; phi: median of log p + H; at gamma_max: share of tokens whose "
              "IDFT gamma is clamped at its maximum; DFT / IDFT weight: mean p and mean p^gamma (x the rest's).", ""]
    for model_name, stats in classes.items():
        lines += [f"### Under {model_name}", "",
                  "| class | tokens | p | phi (median) | gamma (mean) | at gamma_max | DFT weight (x rest) | IDFT weight (x rest) "
                  "| share of the loss weight: SFT / DFT / IDFT |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for c, s in stats.items():
            if c == "train_loss":
                continue
            lines.append(f"| {c} | {s['tokens']} | {s['p_mean']:.3f} | {s['phi_median']:+.2f} | {s['gamma_mean']:.2f} | "
                         f"{100 * s['share_gamma_max']:.0f}% | {s['w_dft']:.3g} ({s['w_dft_rel']:.2f}) | "
                         f"{s['w_idft']:.3g} ({s['w_idft_rel']:.2g}) | {100 * s['share_sft']:.1f}% / "
                         f"{100 * s['share_dft']:.1f}% / {100 * s['share_idft']:.1f}% |")
        if "train_loss" in stats:
            tl = stats["train_loss"]
            lines += ["", f"Re-trained: training loss {tl['retrained']:.6f}; the committed unit's: "
                          f"{tl['committed'] if tl['committed'] is None else format(tl['committed'], '.6f')}."]
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="a compare recipe (YAML) whose units are committed")
    parser.add_argument("--retrain", nargs="*", default=[], metavar="LABEL@LR",
                        help="units to re-train (at --seed) and measure, e.g. idft@1e-5 sft@1e-5")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from trl_onpolicy.compare.config import load_config_file
    from trl_onpolicy.compare.runner import Comparison
    from trl_onpolicy.utils.io import atomic_write_text

    wanted = []
    for item in args.retrain:
        label, _, lr = item.partition("@")
        try:
            rate = float(lr)
        except ValueError:
            raise SystemExit(f"--retrain {item!r}: write LABEL@LR, e.g. idft@1e-5") from None
        if not (math.isfinite(rate) and rate > 0):
            raise SystemExit(f"--retrain {item!r}: the learning rate must be a finite number > 0")
        wanted.append((label, rate))
    if args.seed < 0:
        raise SystemExit(f"--seed {args.seed}: must be an integer >= 0")
    comparison = Comparison(load_config_file(args.config), progress=False)
    labels = [s.label for s in comparison.cfg.method_specs]
    for label, lr in wanted:
        if label not in labels:
            raise SystemExit(f"--retrain {label}@{lr:g}: the recipe has no method labelled {label!r} (it has {labels})")
    torch.set_num_threads(comparison.cfg.num_threads or torch.get_num_threads())
    idft = idft_settings(comparison)

    shares = unit_format_shares(comparison)
    classes: dict[str, dict] = {}
    model, tokenizer = comparison.load_base()
    with torch.no_grad():
        classes["the base model"] = token_class_stats(comparison, model, tokenizer, idft)
    del model
    for label, lr in tqdm(wanted, desc="re-trained units"):
        model, tokenizer, stored, info = retrain(comparison, label, lr, args.seed)
        with torch.no_grad():
            stats = token_class_stats(comparison, model, tokenizer, idft)
        stats["train_loss"] = {"retrained": info["train_loss"], "committed": (stored or {}).get("train_loss")}
        classes[f"{label} at lr {lr:g}, seed {args.seed} (after training)"] = stats
        del model

    out = Path(comparison.cfg.output_dir)
    atomic_write_text(out / "format_tokens.json",
                      json.dumps({"idft": idft, "units": shares, "token_classes": classes}, indent=1) + "\n")
    text = markdown(comparison.cfg.title or args.config, shares, classes)
    atomic_write_text(out / "format_tokens.md", text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
