"""The report section of a study with a DEV split and item-level records (the second CPU study's design): each
method at the learning rate chosen on DEV (test numbers only at that rate), a frontier table with the
out-of-domain change and the answer-format shares (cut off, answer marker), item-level paired bootstraps over
problems x seeds (`trl_onpolicy.compare.stats`) for each method against SFT and for the recipe's contrasts, and the
smallest retention change the retention sets can detect.

It also holds the rate choice the whole report uses (`best_group`: DEV accuracy when there is a DEV split, else the
in-domain gain). `section` is called by `trl_onpolicy.compare.report.write_report`; it returns None for a study whose
units record neither a DEV split nor per-problem scores (the first study's report stays as it was).
"""

from __future__ import annotations

import math

from trl_onpolicy.compare.config import DEV_SET
from trl_onpolicy.compare.fmt import _rate, _row, _stat
from trl_onpolicy.compare.stats import min_detectable_difference, paired_bootstrap, t_interval, verdict

RESAMPLES = 2000
BOOTSTRAP_SEED = 0
ROLES = (("in_domain", "in-domain"), ("ood", "OOD"), ("retention", "retention"))


def selected_on_dev(groups: list[dict]) -> bool:
    """Whether the best rates are chosen on the DEV split (every finished trained group has DEV accuracy)."""
    trained = [g for g in groups if g["per_seed"] and g["learning_rate"] is not None]
    return bool(trained) and all(g["metrics"].get("dev_acc") is not None for g in trained)


def best_group(groups: list[dict]) -> dict | None:
    """The group with the highest mean DEV accuracy when every one has it (over the seeds every group finished, so a
    rate scanned at seed 0 and a rate then run at three seeds are compared on seed 0), else the highest mean
    in-domain gain."""
    dev = selected_on_dev(groups)
    finished = [g for g in groups if g["per_seed"]]
    shared = set.intersection(*(set(g["per_seed"]) for g in finished)) if finished else set()

    def score(g):
        if dev and shared:
            return sum(g["per_seed"][s]["dev_acc"] for s in shared) / len(shared)
        for m in (("dev_acc",) if dev else ()) + ("in_domain_gain", "in_domain_acc"):
            stat = g["metrics"].get(m)
            if stat is not None:
                return stat["mean"]
        return -math.inf

    return max(finished, key=score) if finished else None


def best_by_label(groups: list[dict]) -> dict[str, dict]:
    """Each label's `best_group` (labels in first-seen order; a label with no finished group is left out)."""
    out = {}
    for label in dict.fromkeys(g["label"] for g in groups):
        best = best_group([g for g in groups if g["label"] == label])
        if best is not None:
            out[label] = best
    return out


def _sft_groups(groups: list[dict]) -> list[dict]:
    return [g for g in groups if g["method"] == "sft" and g["label"] == "sft"] or [g for g in groups if g["method"] == "sft"]


def role_items(r: dict, sets, role: str) -> list[float] | None:
    """A unit's per-problem scores over every set of ``role`` (concatenated in recipe order); None when one is missing."""
    items = r.get("items") or {}
    names = [s.name for s in sets if s.role == role]
    if not names or any(n not in items for n in names):
        return None
    return [x for n in names for x in items[n]]


def role_shares(r: dict, sets, role: str) -> dict:
    """Cut-off and marker shares of a unit over the samples of every set of ``role`` (None when not recorded)."""
    fmt = [(r.get("format") or {}).get(s.name) for s in sets if s.role == role]
    fmt = [f for f in fmt if f and f.get("samples")]
    if not fmt:
        return {"cut_off": None, "marker": None}
    n = sum(f["samples"] for f in fmt)
    return {k: sum(f[k] * f["samples"] for f in fmt) / n for k in ("cut_off", "marker")}


def _units_by_group(results: dict) -> dict:
    out: dict[tuple, dict] = {}
    for r in results.values():
        if r.get("status") == "ok":
            out.setdefault((r.get("label"), r.get("learning_rate")), {})[r.get("seed")] = r
    return out


def bootstrap_pair(units: dict, sets, a: dict, b: dict) -> dict:
    """Per role, the paired bootstrap of (a - b) over the problems of that role and the seeds both finished."""
    ua, ub = units.get((a["label"], a["learning_rate"]), {}), units.get((b["label"], b["learning_rate"]), {})
    out = {}
    for role, _ in ROLES:
        xa = {s: role_items(r, sets, role) for s, r in ua.items()}
        xb = {s: role_items(r, sets, role) for s, r in ub.items()}
        xa = {s: v for s, v in xa.items() if v is not None and xb.get(s) is not None}
        out[role] = paired_bootstrap(xa, {s: xb[s] for s in xa}, RESAMPLES, BOOTSTRAP_SEED) if xa else None
    return out


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _bootstrap_cell(stat: dict | None, a: str, b: str) -> str:
    if stat is None:
        return "–"
    return f"{100 * stat['mean']:+.1f} [{100 * stat['ci_low']:+.1f}, {100 * stat['ci_high']:+.1f}] {verdict(stat, a, b)}"


def section(agg: dict, results: dict, cfg) -> tuple[list[str], dict] | None:
    """Markdown lines and a results.json payload, or None when no unit records a DEV split or per-problem scores."""
    if not any(r.get("dev_eval") or r.get("items") for r in results.values() if r.get("status") == "ok"):
        return None
    sets = cfg.eval_sets
    groups = [g for g in agg["groups"] if g["per_seed"]]
    units = _units_by_group(results)
    dev = selected_on_dev(groups)
    lines = ["## Selection on the DEV split" if dev else "## Study tables (no DEV split: rates chosen on the test sets)", ""]
    if dev:
        lines += ["Each method's learning rate is the one with the highest mean accuracy on the DEV split (`data.dev_n`: "
                  "held-out training-split problems, disjoint from the training rows and the test sets); the test sets "
                  "are reported at that rate only.", ""]

    def shares(g, role):
        per = [role_shares(r, sets, role) for r in units.get((g["label"], g["learning_rate"]), {}).values()]
        return {k: t_interval([p[k] for p in per], bounds=(0.0, 1.0)) for k in ("cut_off", "marker")}

    best = best_by_label(groups)
    head = ["method", "lr", "seeds", "DEV acc %", "in-domain acc %", "in-domain gain (pts)", "OOD Δ (pts)",
            "retention Δ (pts)", "KL general", "cut off % (in-domain)", "marker % (in-domain)"]
    lines += ["### Each method at its chosen rate (mean over seeds [95% t-interval])", "", _row(head), "|" + "---|" * len(head)]
    for label, g in best.items():
        m, sh = g["metrics"], shares(g, "in_domain")
        lines.append(_row([label, _rate(g["learning_rate"]), len(g["per_seed"]), _stat(m.get("dev_acc")), _stat(m["in_domain_acc"]),
                           _stat(m["in_domain_gain"], signed=True), _stat(m["ood_change"], signed=True),
                           _stat(m["retention_change"], signed=True), _stat(m["kl_general"], 1, 4),
                           _stat(sh["cut_off"]), _stat(sh["marker"])]))
    lines.append("")

    head = ["method", "lr", "DEV acc %", "in-domain gain (pts)", "OOD Δ (pts)", "retention Δ (pts)", "KL general",
            "cut off % in-domain / OOD", "marker % in-domain / OOD"]
    lines += ["### Frontier with the out-of-domain change and the answer format (every rate)", "", _row(head),
              "|" + "---|" * len(head)]
    for g in groups:
        m, si, so = g["metrics"], shares(g, "in_domain"), shares(g, "ood")
        lines.append(_row([g["label"], _rate(g["learning_rate"]), _stat(m.get("dev_acc")), _stat(m["in_domain_gain"], signed=True),
                           _stat(m["ood_change"], signed=True), _stat(m["retention_change"], signed=True),
                           _stat(m["kl_general"], 1, 4), f"{_stat(si['cut_off'])} / {_stat(so['cut_off'])}",
                           f"{_stat(si['marker'])} / {_stat(so['marker'])}"]))
    lines.append("")

    sft = best_group(_sft_groups(groups))
    pairs = [(label, g, "sft", sft) for label, g in best.items() if sft is not None and label != sft["label"]
             and g["method"] != "base"]
    pairs += [(a, best[a], b, best[b]) for a, b in getattr(cfg, "contrasts", ()) if a in best and b in best]
    rows = []
    if pairs:
        head = ["a", "a lr", "b", "b lr"] + [f"Δ {name} (pts) [95%] verdict" for _, name in ROLES]
        lines += [f"### Item-level paired bootstrap, a − b (problems × shared seeds, {RESAMPLES} resamples, seed "
                  f"{BOOTSTRAP_SEED}; each side at its chosen rate)", "",
                  "An ordering is stated only when the interval excludes 0 and has width; a zero-width interval (e.g. "
                  "identical answers) is reported as no spread, not as an ordering.", "", _row(head), "|" + "---|" * len(head)]
        for a, ga, b, gb in pairs:
            boot = bootstrap_pair(units, sets, ga, gb)
            rows.append({"a": a, "a_learning_rate": ga["learning_rate"], "b": b, "b_learning_rate": gb["learning_rate"],
                         "bootstrap": boot, "verdicts": {role: verdict(boot[role], a, b) for role, _ in ROLES}})
            lines.append(_row([a, _rate(ga["learning_rate"]), b, _rate(gb["learning_rate"])]
                              + [_bootstrap_cell(boot[role], a, b) for role, _ in ROLES]))
        lines.append("")

    rule = decision(rows, groups)
    if rule is not None:
        lines += [f"**Decision rule** (docs/results.md, study 2; {rule['a']} vs {rule['b']}): " + rule["text"], ""]

    base = next((r for r in results.values() if r.get("status") == "ok" and r.get("method") == "base"), None)
    mdd = {}
    for s in sets:
        if s.role != "retention" or base is None or s.name not in (base.get("eval") or {}):
            continue
        ev = base["eval"][s.name]
        mdd[s.name] = {"n": ev.get("num_prompts"), "base_accuracy": ev.get("accuracy"),
                       "mdd": min_detectable_difference(int(ev["num_prompts"]), float(ev["accuracy"]))}
    if mdd:
        lines += ["Smallest retention change each retention set detects (80% power, two-sided 5%, normal approximation "
                  "for two proportions at the base model's accuracy; pairing helps only where the arms agree): "
                  + "; ".join(f"{name}: {v['n']} problems, ±{100 * v['mdd']:.1f} pts" for name, v in mdd.items())
                  + ". A retention difference smaller than this is not a finding either way.", ""]
    payload = {"selected_on_dev": dev, "decision": rule, "dev_set": DEV_SET if dev else None,
               "chosen": {label: g["learning_rate"] for label, g in best.items()}, "bootstrap": rows,
               "min_detectable_difference": mdd}
    return lines, payload


MARGIN = 0.05  # "within 5 points of SFT in-domain": the lower end of the in-domain interval above -5 points


def frontier_above(a: list[dict], b: list[dict], x: str = "kl_general", y: str = "in_domain_gain") -> bool | None:
    """Whether every point of ``a`` (groups: one per rate) whose ``x`` lies within the range of ``b``'s points has a
    higher mean ``y`` than ``b``'s frontier, linearly interpolated at that ``x`` (b's points in increasing x); None
    when no point of ``a`` lies in ``b``'s range (the frontiers do not overlap: no comparison)."""
    def pts(groups):
        out = [(g["metrics"][x]["mean"], g["metrics"][y]["mean"]) for g in groups
               if g["metrics"].get(x) is not None and g["metrics"].get(y) is not None]
        return sorted(out)

    pa, pb = pts(a), pts(b)
    if len(pb) < 2:
        return None
    verdicts = []
    for xa, ya in pa:
        for (x0, y0), (x1, y1) in zip(pb, pb[1:]):
            if x0 <= xa <= x1:
                yb = y0 if x1 == x0 else y0 + (y1 - y0) * (xa - x0) / (x1 - x0)
                verdicts.append(ya > yb)
                break
    return all(verdicts) if verdicts else None


def decision(rows: list[dict], groups: list[dict], a: str = "idft", b: str = "sft") -> dict | None:
    """The pre-registered rule of study 2 (docs/results.md): the paper's claim is supported here when (A) ``a`` is
    within 5 points of ``b`` in-domain (the lower end of the paired bootstrap interval of a - b above -5 points) and
    better out of domain and on retention (intervals above 0, with width), or (B) ``a``'s in-domain-gain-vs-general-KL
    frontier lies above ``b``'s (`frontier_above`, over every rate each ran). None when either side is missing."""
    row = next((r for r in rows if r["a"] == a and r["b"] == b), None)
    if row is None:
        return None
    boot = row["bootstrap"]

    def better(role):
        st = boot.get(role)
        return st is not None and st["ci_low"] > 0 and not st["zero_width"]

    within = boot.get("in_domain") is not None and boot["in_domain"]["ci_low"] > -MARGIN
    kept = better("ood") and better("retention")
    above = frontier_above([g for g in groups if g["label"] == a], [g for g in groups if g["label"] == b])
    supported = (within and kept) or above is True
    text = (f"(A) within {100 * MARGIN:.0f} points in-domain: {'yes' if within else 'no'}; better OOD and retention "
            f"(intervals above 0): {'yes' if kept else 'no'}; (B) gain-vs-general-KL frontier above: "
            f"{'not comparable (no overlap in KL)' if above is None else 'yes' if above else 'no'}. "
            f"The claim is {'SUPPORTED' if supported else 'NOT supported'} here.")
    return {"a": a, "b": b, "within_margin": within, "ood_and_retention_better": kept, "frontier_above": above,
            "supported": supported, "text": text}
