"""Aggregation, pairing, tables and plots of a `trl_onpolicy.compare.runner` sweep.

Input: the per-unit results (one per method x learning rate x seed, as `Comparison.run_unit` writes them). Output:

- per unit, the scalar metrics: accuracy per set (with its Wilson interval from the evaluation), the mean accuracy of
  the in-domain / out-of-domain / retention sets, the change against the base model (in-domain gain, retention
  change), KL(base || trained) on in-domain and general prompts, the held-out NLL, and cost;
- per (method, learning rate) group, every metric's mean over the seeds with a 95% Student-t interval over seeds
  (``mean +- t_{0.975, n-1} * sd / sqrt(n)``: the seed is the unit of replication; with one seed no interval is given,
  and the per-seed Wilson intervals stay in the per-unit table);
- paired differences against SFT: for each group, (method - SFT) on every seed both finished (same seed, hence the
  same data order and initial randomness), then the mean and t-interval of those differences. The SFT rate it is
  paired with is the same rate when SFT ran it, else SFT's best rate (highest mean in-domain gain);
- each method at its best rate against SFT at its best rate, paired the same way (the "which method is better, each
  tuned" question); the best rate is chosen on the same evaluation, so both sides are optimistic alike;
- ``results.md`` (tables), ``results.json`` (everything), ``frontier.png`` (in-domain gain against KL to base, one point
  per learning rate with seed intervals on both axes; retention change against in-domain gain) and
  ``compare_accuracy.png`` (accuracy per set and group).

A unit stored under another configuration (``"stale"``: what changed, e.g. ``["model"]``) is reported as recorded and
marked wherever it appears; the library versions each unit records are listed, with the units that differ.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path
from typing import Any

from trl_onpolicy.compare.fmt import _rate, _row, _stat, _val
from trl_onpolicy.compare.selection import _sft_groups, best_by_label, best_group, section, selected_on_dev
from trl_onpolicy.compare.stats import t_interval
from trl_onpolicy.utils.io import atomic_write_bytes, atomic_write_text, write_json_atomic

# metrics aggregated over seeds and (the first group) paired against SFT
PAIRED = ("in_domain_acc", "retention_acc", "ood_acc", "kl_in_domain", "kl_general", "heldout_nll")
AGGREGATED = PAIRED + ("in_domain_gain", "retention_change", "ood_change", "nll_change", "steps", "tokens_trained",
                       "train_seconds", "wall_seconds")


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


# ----------------------------------------------------------------------------------------------------------------------
# Per unit
# ----------------------------------------------------------------------------------------------------------------------


def unit_scalars(r: dict, sets, base: dict | None) -> dict:
    """The scalar metrics of one finished unit (``base``: the base model's scalars for the changes, or None)."""
    ev = r.get("eval") or {}
    out: dict[str, Any] = {"sets": {s.name: {k: ev[s.name].get(k) for k in ("accuracy", "ci_low", "ci_high", "num_prompts", "k", "ci_method")}
                                    for s in sets if s.name in ev}}
    for role, key in (("in_domain", "in_domain_acc"), ("ood", "ood_acc"), ("retention", "retention_acc")):
        accs = [ev[s.name]["accuracy"] for s in sets if s.role == role and s.name in ev]
        out[key] = sum(accs) / len(accs) if accs else None
    metrics = r.get("metrics") or {}
    for key in ("kl_in_domain", "kl_general", "heldout_nll"):
        m = metrics.get(key)
        out[key] = m.get("mean") if isinstance(m, dict) else None
        out[f"{key}_ci"] = (m.get("ci_low"), m.get("ci_high")) if isinstance(m, dict) else None
    for key in ("steps", "tokens_trained", "train_seconds", "wall_seconds", "peak_rss_mib"):
        out[key] = r.get(key)
    if r.get("dev_eval"):  # the DEV split (data.dev_n): chooses each method's learning rate
        out["dev_acc"] = r["dev_eval"].get("accuracy")
    for key, (a, b) in {"in_domain_gain": ("in_domain_acc",) * 2, "retention_change": ("retention_acc",) * 2,
                        "ood_change": ("ood_acc",) * 2, "nll_change": ("heldout_nll",) * 2}.items():
        out[key] = out[a] - base[b] if base is not None and out[a] is not None and base.get(b) is not None else None
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Aggregation over seeds and pairing
# ----------------------------------------------------------------------------------------------------------------------


def aggregate(results: dict, sets, contrasts=()) -> dict:
    """Groups (method label, learning rate) with per-seed scalars and seed aggregates, and paired differences vs SFT.

    ``results`` maps unit keys to unit results (`Comparison.run_unit`)."""
    ok = {k: r for k, r in results.items() if r.get("status") == "ok"}
    base_raw = {r.get("seed"): r for r in ok.values() if r.get("method") == "base"}
    base_scalars = {seed: unit_scalars(r, sets, None) for seed, r in base_raw.items()}

    def base_for(seed):
        if seed in base_scalars:
            return base_scalars[seed]
        if None in base_scalars:
            return base_scalars[None]
        return next(iter(base_scalars.values()), None)

    groups: dict[tuple, dict] = {}
    units: dict[str, dict] = {}
    for key, r in results.items():
        gkey = (r.get("label"), r.get("learning_rate"))
        g = groups.setdefault(gkey, {"label": r.get("label"), "method": r.get("method"), "learning_rate": r.get("learning_rate"),
                                     "seeds": [], "per_seed": {}, "failed": [], "args": r.get("args"), "stale": 0})
        g["seeds"].append(r.get("seed"))
        g["stale"] += bool(r.get("stale"))
        summary = {k: r.get(k) for k in ("key", "label", "method", "learning_rate", "seed", "status", "error", "corpus",
                                         "num_train_samples", "stale", "versions")}
        if r.get("status") == "ok":
            scalars = unit_scalars(r, sets, base_for(r.get("seed")))
            summary.update(scalars)
            summary["train_phi"] = (r.get("train_phi") or {}).get("mean_phi")
            g["per_seed"][r.get("seed")] = scalars
        else:
            g["failed"].append({"seed": r.get("seed"), "status": r.get("status"), "error": r.get("error")})
        for extra in ("pairs", "hinted_summary"):
            if r.get(extra):
                summary[extra] = r[extra]
        units[key] = summary
    set_keys = [s.name for s in sets]
    for g in groups.values():
        per = list(g["per_seed"].values())
        g["metrics"] = {m: t_interval([p.get(m) for p in per]) for m in AGGREGATED}
        if any("dev_acc" in p for p in per):
            g["metrics"]["dev_acc"] = t_interval([p.get("dev_acc") for p in per])
        g["set_metrics"] = {name: t_interval([p["sets"][name]["accuracy"] for p in per if name in p["sets"]]) for name in set_keys}
    ordered = list(groups.values())
    return {"units": units, "groups": ordered, "paired": paired_vs_sft(ordered), "best_vs_best": best_vs_best(ordered),
            "contrasts": contrast_rows(ordered, contrasts)}


def _paired(g: dict, ref: dict) -> tuple[list, dict]:
    """The seeds both groups finished and the t-interval of (g - ref) over them, per metric of PAIRED."""
    seeds = [s for s in g["per_seed"] if s in ref["per_seed"]]
    diffs = {}
    for m in PAIRED:
        values = [g["per_seed"][s].get(m) - ref["per_seed"][s].get(m) for s in seeds
                  if g["per_seed"][s].get(m) is not None and ref["per_seed"][s].get(m) is not None]
        diffs[m] = t_interval(values)
    return seeds, diffs


def paired_vs_sft(groups: list[dict]) -> list[dict]:
    """(method - SFT) per shared seed, aggregated with a t-interval; one row per non-SFT, non-base group."""
    sft = _sft_groups(groups)
    if not sft:
        return []
    best = best_group(sft)
    rows = []
    for g in groups:
        if g["method"] in ("base", "sft") or not g["per_seed"]:
            continue
        ref = next((s for s in sft if s["learning_rate"] == g["learning_rate"] and s["per_seed"]), best)
        if ref is None:
            continue
        seeds, diffs = _paired(g, ref)
        rows.append({"label": g["label"], "method": g["method"], "learning_rate": g["learning_rate"],
                     "sft_learning_rate": ref["learning_rate"], "sft_rate_rule": "same rate" if ref["learning_rate"] == g["learning_rate"] else "SFT's best rate",
                     "seeds": seeds, "diff": diffs})
    return rows


def contrast_rows(groups: list[dict], contrasts) -> list[dict]:
    """(a - b) for each ``(a, b)`` of method labels, at every learning rate both ran, paired on the seeds both
    finished (e.g. IDFT - DFT: what IDFT's adaptive gamma adds over DFT's fixed one)."""
    rows = []
    for a, b in contrasts:
        for g in groups:
            if g["label"] != a or not g["per_seed"]:
                continue
            ref = next((r for r in groups if r["label"] == b and r["learning_rate"] == g["learning_rate"] and r["per_seed"]), None)
            if ref is None:
                continue
            seeds, diffs = _paired(g, ref)
            rows.append({"label": a, "reference": b, "learning_rate": g["learning_rate"], "seeds": seeds, "diff": diffs})
    return rows


def best_vs_best(groups: list[dict]) -> list[dict]:
    """Each method label at its best rate (highest mean in-domain gain) minus SFT at its best rate, paired on seed;
    one row per label other than base and SFT."""
    sft = best_group(_sft_groups(groups))
    if sft is None:
        return []
    rows = []
    for label in dict.fromkeys(g["label"] for g in groups):
        if label == sft["label"] or any(g["method"] == "base" for g in groups if g["label"] == label):
            continue
        g = best_group([g for g in groups if g["label"] == label])
        if g is None:
            continue
        seeds, diffs = _paired(g, sft)
        rows.append({"label": label, "method": g["method"], "learning_rate": g["learning_rate"],
                     "sft_learning_rate": sft["learning_rate"], "seeds": seeds, "diff": diffs})
    return rows


# ----------------------------------------------------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------------------------------------------------


def stale_text(changed) -> str:
    """``["model"]`` -> "model changed"; a result without a fingerprint -> "no fingerprint"."""
    return "no fingerprint" if list(changed) == ["fingerprint"] else f"{', '.join(changed)} changed"


def _seeds_ok(g: dict) -> str:
    return f"{len(g['per_seed'])}/{len(g['seeds'])}" + (f" ({g['stale']} stale)" if g.get("stale") else "")


def version_table(units: dict) -> dict[str, dict[str, list[str]]]:
    """``{library: {version: [unit keys]}}`` over the units that record versions (``"unknown"``: a unit that records
    none, written before versions were recorded; it is not counted as a difference)."""
    table: dict[str, dict[str, list[str]]] = {}
    for key, u in units.items():
        for lib, version in (u.get("versions") or {}).items():
            table.setdefault(lib, {}).setdefault(str(version), []).append(key)
    return table


def version_lines(units: dict) -> list[str]:
    table = version_table(units)
    if not table:
        return []
    unknown = sum(not u.get("versions") for u in units.values())
    note = f" {unknown} unit(s) record no versions (written by an older compare): unknown, not a difference." if unknown else ""
    differ = {lib: v for lib, v in table.items() if len(v) > 1}
    same = ", ".join(f"{lib} {next(iter(v))}" for lib, v in table.items() if len(v) == 1)
    if not differ:
        return [f"Library versions (every unit that records them): {same}.{note}", ""]
    lines = [f"**Library versions differ across units** (numbers may not rebuild exactly on one machine).{note}"
             + (f" Shared: {same}." if same else ""), "", _row(["library", "version", "units"]), "|---|---|---|"]
    for lib, versions in differ.items():
        for version, keys in versions.items():
            shown = ", ".join(f"`{k}`" for k in keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")
            lines.append(_row([lib, version, f"{len(keys)}: {shown}"]))
    return lines + [""]


def results_markdown(agg: dict, sets, title: str | None = None, sweep_note: str | None = None,
                     extra: list[str] | None = None) -> str:
    """The report's markdown; ``extra``: lines placed after the frontier summary (e.g. the DEV-split selection)."""
    groups, units, paired = agg["groups"], agg["units"], agg["paired"]
    n_ok = sum(u["status"] == "ok" for u in units.values())
    lines = [f"# {title or 'Method comparison'}", ""]
    if sweep_note:
        lines += [sweep_note, ""]
    lines += [f"Units finished: {n_ok} of {len(units)}.", ""]
    stale = {k: u["stale"] for k, u in units.items() if u.get("stale")}
    if stale:
        counts: dict[str, int] = {}
        for changed in stale.values():
            counts[stale_text(changed)] = counts.get(stale_text(changed), 0) + 1
        lines += [f"**{len(stale)} of {len(units)} units were produced under a different configuration than this "
                  f"recipe's** ({', '.join(f'{what}: {n}' for what, n in counts.items())}). Their numbers are shown as "
                  "recorded, marked in the per-unit table and counted as stale in the group rows; run compare without "
                  "--report_only to recompute them.", ""]

    lines += ["## Frontier summary (mean over seeds [95% t-interval over seeds])", ""]
    head = ["method", "lr", "seeds ok", "in-domain acc %", "in-domain gain vs base (pts)", "retention Δ vs base (pts)",
            "KL(base‖model) in-domain (nats/token)", "KL general (nats/token)", "held-out NLL (nats/token)", "train s"]
    lines += [_row(head), "|" + "---|" * len(head)]
    for g in groups:
        m = g["metrics"]
        lines.append(_row([g["label"], _rate(g["learning_rate"]), _seeds_ok(g), _stat(m["in_domain_acc"]), _stat(m["in_domain_gain"], signed=True),
                           _stat(m["retention_change"], signed=True), _stat(m["kl_in_domain"], 1, 4),
                           _stat(m["kl_general"], 1, 4), _stat(m["heldout_nll"], 1, 3),
                           _stat(m["train_seconds"], 1, 0)]))
    lines.append("")
    best = [f"{label} {_rate(b['learning_rate'])}"
            for label, b in best_by_label([g for g in groups if g["learning_rate"] is not None]).items()]
    dev = selected_on_dev(groups)
    if best:
        rule = "highest mean DEV-split accuracy over its seeds" if dev else "highest mean in-domain gain over its seeds"
        lines += [f"Best learning rate per method ({rule}): " + ", ".join(best) + ".", ""]
    lines += extra or []

    lines += ["## Accuracy per set (mean over seeds [95% t-interval over seeds])", ""]
    head = ["method", "lr", "seeds ok"] + [f"{s.name} ({s.role}) %" for s in sets]
    lines += [_row(head), "|" + "---|" * len(head)]
    for g in groups:
        lines.append(_row([g["label"], _rate(g["learning_rate"]), _seeds_ok(g)]
                          + [_stat(g["set_metrics"].get(s.name)) for s in sets]))
    lines.append("")

    def diff_rows(rows, ref_head, ref_cell):
        head = ["method", "lr", ref_head, "seeds", "Δ in-domain (pts)", "Δ retention (pts)", "Δ ood (pts)",
                "Δ KL in-domain", "Δ KL general", "Δ held-out NLL"]
        out = [_row(head), "|" + "---|" * len(head)]
        for p in rows:
            d = p["diff"]
            out.append(_row([p["label"], _rate(p["learning_rate"]), ref_cell(p),
                             len(p["seeds"]), _stat(d["in_domain_acc"], signed=True), _stat(d["retention_acc"], signed=True),
                             _stat(d["ood_acc"], signed=True), _stat(d["kl_in_domain"], 1, 4, True),
                             _stat(d["kl_general"], 1, 4, True), _stat(d["heldout_nll"], 1, 3, True)]))
        return out + [""]

    if agg.get("best_vs_best"):
        lines += ["## Each method at its best rate vs SFT at its best rate (method − SFT, paired on seed; mean [95% t-interval])",
                  "", ("Each side's best rate is the one with the highest mean accuracy on the DEV split (held-out problems, "
                       "not these test sets). A t-interval over 3 seeds that has zero width is no evidence of an ordering; "
                       "the item-level paired bootstrap above is the test." if dev else
                       "Each side's best rate is the one with the highest mean in-domain gain on this same evaluation, so both "
                       "are optimistic alike. An interval that excludes 0 is an ordering that holds across seeds at this scale."), ""]
        lines += diff_rows(agg["best_vs_best"], "SFT lr", lambda p: _rate(p["sft_learning_rate"]))
    if agg.get("contrasts"):
        lines += ["## Contrasts (a − b on the same seed and learning rate; mean [95% t-interval])", "",
                  "The recipe's `contrasts`. An interval that excludes 0 is a difference that holds across seeds at this scale.", ""]
        lines += diff_rows(agg["contrasts"], "vs (b)", lambda p: p["reference"])
    if paired:
        lines += ["## Paired differences vs SFT (method − SFT on the same seed and data order; mean [95% t-interval])",
                  "", "An interval that excludes 0 is a difference that holds across seeds at this scale.", ""]
        lines += diff_rows(paired, "SFT lr", lambda p: f"{_rate(p['sft_learning_rate'])} ({p['sft_rate_rule']})")

    lines += ["## Per unit (accuracy with its Wilson 95% interval over problems)", ""]
    head = ["unit", "status"] + [f"{s.name} %" for s in sets] + ["KL in-domain", "KL general", "held-out NLL",
                                                                   "train phi", "steps", "tokens", "train s", "wall s", "peak RSS MiB"]
    lines += [_row(head), "|" + "---|" * len(head)]
    for key, u in units.items():
        cells = [key, u["status"] + (f" ({stale_text(u['stale'])})" if u.get("stale") else "")]
        for s in sets:
            m = (u.get("sets") or {}).get(s.name)
            cells.append(f"{100 * m['accuracy']:.1f} [{100 * m['ci_low']:.1f}, {100 * m['ci_high']:.1f}]" if m else "–")
        cells += [_val(u.get("kl_in_domain"), digits=4), _val(u.get("kl_general"), digits=4), _val(u.get("heldout_nll")),
                  _val(u.get("train_phi")), u.get("steps", "–") if u.get("steps") is not None else "–",
                  u.get("tokens_trained") if u.get("tokens_trained") is not None else "–",
                  _val(u.get("train_seconds"), digits=0), _val(u.get("wall_seconds"), digits=0), _val(u.get("peak_rss_mib"), digits=0)]
        lines.append(_row(cells))
    lines.append("")

    notes = [(k, u) for k, u in units.items() if u["status"] != "ok"]
    if notes:
        lines += ["Units that did not finish:", ""]
        lines += [f"- `{k}` ({u['status']}): {u.get('error')}" for k, u in notes]
        lines.append("")
    pairs = next((u["pairs"] for u in units.values() if u.get("pairs")), None)
    if pairs:
        lines += ["Preference pairs (DPO/SimPO): " + ", ".join(f"{k}={v}" for k, v in pairs.items()), ""]
    hinted = next((u["hinted_summary"] for u in units.values() if u.get("hinted_summary")), None)
    if hinted:
        keys = ("num_samples", "num_kept", "accuracy", "fallback", "num_realigned_used", "num_reference_used")
        lines += ["Hinted-Decoding corpus: " + ", ".join(f"{k}={hinted.get(k)}" for k in keys if k in hinted), ""]
    lines += version_lines(units)
    lines += [
        "Accuracy: greedy pass@1 per unit with a Wilson 95% interval over problems (avg@k: normal interval over "
        "per-prompt scores); group rows average the seeds, with a Student-t 95% interval over seeds (none with one "
        "seed). In-domain gain / retention Δ: change of the mean accuracy of the in-domain / retention sets against "
        "`base`, in points. KL(base‖model): per-token forward KL, exact over the vocabulary at each position of "
        "responses the base model sampled at temperature 1 (once per study), on held-out in-domain prompts and on "
        "general non-math prompts (RL's Razor: it predicts forgetting). Held-out NLL: per-token negative "
        "log-likelihood of reference solutions the model was not trained on. Train phi: mean DDT phi (log p + H) of "
        "the training responses under the base model (0 = on-policy). Peak RSS: the whole process, sampled.",
        "",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------------------------------


def error_bar(stat: dict | None, scale: float) -> tuple[float, float, float] | None:
    """A seed statistic as (mean, lower error, upper error), scaled; zero errors without an interval."""
    if stat is None:
        return None
    mean = scale * stat["mean"]
    if stat.get("ci_low") is None:
        return mean, 0.0, 0.0
    return mean, mean - scale * stat["ci_low"], scale * stat["ci_high"] - mean


def plot_frontier(agg: dict, path: str | Path, title: str | None = None) -> bool:
    """Two panels: in-domain gain (points) against KL(base‖model) on in-domain prompts, and retention change against
    in-domain gain; one marker per (method, learning rate) with 95% seed intervals on both axes, the rates of one
    method joined in increasing order. Returns False when no trained group has finished."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [g for g in agg["groups"] if g["method"] != "base" and g["per_seed"]]
    if not groups:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    labels = list(dict.fromkeys(g["label"] for g in groups))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    markers = "osD^vP*Xh<>"
    panels = [(axes[0], "kl_in_domain", 1.0, "in_domain_gain", 100.0, "KL(base‖model) on held-out in-domain prompts (nats/token)",
               "in-domain gain vs base (points)"),
              (axes[1], "in_domain_gain", 100.0, "retention_change", 100.0, "in-domain gain vs base (points)",
               "retention change vs base (points)")]
    for ax, xm, xs, ym, ys, xlabel, ylabel in panels:
        any_point = False
        for i, label in enumerate(labels):
            rows = sorted((g for g in groups if g["label"] == label), key=lambda g: g["learning_rate"] or 0)
            pts = []
            for g in rows:
                x, y = error_bar(g["metrics"].get(xm), xs), error_bar(g["metrics"].get(ym), ys)
                if x is None or y is None:
                    continue
                pts.append((x, y, g["learning_rate"]))
            if not pts:
                continue
            any_point = True
            color, marker = colors[i % len(colors)], markers[i % len(markers)]
            ax.errorbar([p[0][0] for p in pts], [p[1][0] for p in pts],
                        xerr=[[p[0][1] for p in pts], [p[0][2] for p in pts]],
                        yerr=[[p[1][1] for p in pts], [p[1][2] for p in pts]],
                        color=color, marker=marker, capsize=3, linestyle="-", linewidth=1, label=label)
            for (x, _, _), (y, _, _), lr in pts:
                ax.annotate(_rate(lr), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7, color=color)
        ax.axhline(0, color="grey", linewidth=0.8)
        if xm != "kl_in_domain":
            ax.axvline(0, color="grey", linewidth=0.8)
        ax.plot([0], [0], marker="*", color="black", markersize=10, linestyle="none", label="base", zorder=5)
        if not any_point:
            ax.text(0.5, 0.5, f"no {xm} / {ym} measured", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[0].set_title("learning vs forgetting (one point per learning rate)")
    axes[1].set_title("retention vs learning")
    fig.suptitle(title or "Method comparison: learning-rate frontier (95% intervals over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)
    return True


def plot_accuracy(agg: dict, sets, path: str | Path, title: str | None = None) -> bool:
    """Grouped bars: one group per evaluation set, one bar per (method, rate), mean over seeds with its interval
    (the unit's Wilson interval when there is one seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [g for g in agg["groups"] if g["per_seed"]]
    if not groups:
        return False
    width = 0.8 / len(groups)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(sets) + 0.4 * len(groups)), 4))
    for j, g in enumerate(groups):
        xs, ys, lo, hi = [], [], [], []
        for i, s in enumerate(sets):
            stat = g["set_metrics"].get(s.name)
            if stat is None:
                continue
            if stat["ci_low"] is None:  # one seed: that unit's Wilson interval
                m = next(iter(g["per_seed"].values()))["sets"][s.name]
                stat = {"mean": m["accuracy"], "ci_low": m["ci_low"], "ci_high": m["ci_high"]}
            xs.append(i - 0.4 + width * (j + 0.5))
            ys.append(100 * stat["mean"])
            lo.append(max(0.0, 100 * (stat["mean"] - stat["ci_low"])))
            hi.append(max(0.0, 100 * (stat["ci_high"] - stat["mean"])))
        name = g["label"] if g["learning_rate"] is None else f"{g['label']} {_rate(g['learning_rate'])}"
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=name)
    ax.set_xticks(range(len(sets)))
    ax.set_xticklabels([f"{s.name}\n({s.role})" for s in sets])
    ax.set_ylabel("accuracy % (95% interval)")
    ax.set_ylim(0, 100)
    ax.set_title(title or "Method comparison")
    ax.legend(fontsize=7, ncol=min(len(groups), 4))
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------------------------------------------------
# Everything at once
# ----------------------------------------------------------------------------------------------------------------------


def write_report(results: dict, cfg, out: Path, config: dict, plots: bool = True) -> dict:
    """Aggregate ``results`` and write results.json, results.md and (with ``plots``) frontier.png and
    compare_accuracy.png into ``out``; returns the results.json payload. A study with a DEV split or per-problem
    scores gets `trl_onpolicy.compare.selection.section` too (under ``"selection"`` in results.json). Every file is replaced atomically (a
    temporary file of its own, then a rename), so processes sharing ``out`` never see or leave half a report. An
    existing report is never replaced by an empty one (no unit stored at all): the payload is returned unwritten."""

    agg = aggregate(results, cfg.eval_sets, getattr(cfg, "contrasts", ()))
    seeds = sorted({u["seed"] for u in agg["units"].values() if u.get("seed") is not None})
    rates = sorted({g["learning_rate"] for g in agg["groups"] if g["learning_rate"] is not None})
    note = (f"Sweep: methods {list(dict.fromkeys(g['label'] for g in agg['groups']))}; seeds {seeds}; learning rates "
            f"{[_rate(r) for r in rates]} (per-method grids in the config); budget {cfg.budget.max_steps} steps x "
            f"{cfg.budget.per_device_train_batch_size * cfg.budget.gradient_accumulation_steps} samples.")
    payload = {"config": config, "units": agg["units"], "groups": agg["groups"], "paired": agg["paired"],
               "best_vs_best": agg["best_vs_best"], "contrasts": agg["contrasts"],
               "versions": version_table(agg["units"])}
    extra = section(agg, results, cfg)
    if extra is not None:
        payload["selection"] = extra[1]
    if not results and ((out / "results.md").is_file() or (out / "results.json").is_file()):
        print(f"[compare] no unit is stored under {out}: the existing report is kept, not replaced by an empty one",
              file=sys.stderr)
        return payload
    write_json_atomic(out / "results.json", payload)
    md = results_markdown(agg, cfg.eval_sets, cfg.title, note, extra[0] if extra is not None else None)
    drawn = []
    for name, fn in (("frontier.png", lambda p: plot_frontier(agg, p, cfg.title)),
                     ("compare_accuracy.png", lambda p: plot_accuracy(agg, cfg.eval_sets, p, cfg.title))):
        if not plots:
            if (out / name).is_file():
                drawn.append(name)  # the previous plot stays until the final report redraws it
            continue
        try:
            image = io.BytesIO()
            if fn(image):
                atomic_write_bytes(out / name, image.getvalue())
                drawn.append(name)
        except Exception as err:  # a missing plotting backend must not lose the numbers
            print(f"[compare] plot {name} skipped: {err}", file=sys.stderr)
    if "frontier.png" in drawn:
        md += "\n![frontier: in-domain gain vs KL to base, and retention vs in-domain gain](frontier.png)\n"
    atomic_write_text(out / "results.md", md)
    return payload
