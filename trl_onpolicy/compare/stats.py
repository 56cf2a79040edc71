"""Item-level statistics of a comparison: a paired bootstrap over problems x seeds, the verdict an interval allows,
and the smallest difference an evaluation set of a given size can detect.

Two units of different methods on the same seed answered the same problems, so their per-problem scores pair up.
`paired_bootstrap` resamples the problems (one draw shared by every seed: a problem is hard or easy for every seed)
and the shared seeds (with replacement), and takes the mean difference over the drawn cells; its percentile
interval covers both sources of variation. `verdict` never reads an ordering from a zero-width interval (e.g. three
seeds that tie exactly): that is a lack of spread, not a certainty.
"""

from __future__ import annotations

import math

# two-sided 95% Student-t quantiles t_{0.975, df}; above 30 degrees of freedom the normal value is within 2%
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086,
        21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048, 29: 2.045, 30: 2.042}
Z95 = 1.959963984540054
Z975 = Z95  # two-sided 5%
Z80 = 0.8416212335729143  # 80% power


def t_interval(values, bounds: tuple[float, float] | None = None) -> dict | None:
    """Mean and 95% Student-t interval of independent replicates (``None`` values skipped); ``ci_low``/``ci_high``
    are None with fewer than two values. ``bounds``: the quantity's possible range (a share: ``(0, 1)``), to which
    the interval is clipped."""
    xs = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    n = len(xs)
    if n == 0:
        return None
    mean = sum(xs) / n
    if n == 1:
        return {"mean": mean, "ci_low": None, "ci_high": None, "n": 1, "sd": None}
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = T975.get(n - 1, Z95) * sd / math.sqrt(n)
    low, high = mean - half, mean + half
    if bounds is not None:
        low, high = max(low, bounds[0]), min(high, bounds[1])
    return {"mean": mean, "ci_low": low, "ci_high": high, "n": n, "sd": sd}


def paired_bootstrap(a: dict, b: dict, resamples: int = 2000, seed: int = 0, level: float = 0.95) -> dict | None:
    """Mean of (a - b) over the seeds both have and their problems, with a percentile bootstrap interval.

    Args:
        a, b: ``{seed: [score per problem]}``; the lists of one seed are the same problems in the same order.
        resamples: bootstrap draws; seed: their random seed (the interval repeats for the same inputs).
        level: coverage of the interval.

    Returns ``{"mean", "ci_low", "ci_high", "zero_width", "n_items", "n_seeds", "resamples", "seed"}``, or None when
    no seed is shared."""
    import numpy as np

    seeds = [s for s in a if s in b]
    if not seeds:
        return None
    lengths = {len(a[s]) for s in seeds} | {len(b[s]) for s in seeds}
    if len(lengths) != 1 or 0 in lengths:
        raise ValueError(f"paired_bootstrap: every seed must score the same non-empty problems on both sides; got lengths {sorted(lengths)}")
    d = np.array([[x - y for x, y in zip(a[s], b[s])] for s in seeds], dtype=np.float64)  # [seeds, problems]
    n_seeds, n_items = d.shape
    rng = np.random.default_rng(seed)
    stats = np.empty(resamples)
    for r in range(resamples):
        items = rng.integers(0, n_items, n_items)
        rows = rng.integers(0, n_seeds, n_seeds)
        stats[r] = d[np.ix_(rows, items)].mean()
    tail = (1.0 - level) / 2.0
    low, high = (float(x) for x in np.quantile(stats, [tail, 1.0 - tail]))
    return {"mean": float(d.mean()), "ci_low": low, "ci_high": high, "zero_width": high - low <= 1e-12,
            "n_items": int(n_items), "n_seeds": int(n_seeds), "resamples": int(resamples), "seed": int(seed)}


def verdict(interval: dict | None, a: str = "a", b: str = "b") -> str:
    """What an interval of (a - b) allows one to say: ``"a > b"`` / ``"a < b"`` when it excludes 0 and has width,
    ``"no spread (zero-width interval): not an ordering"`` when it has none, else ``"not resolved"``."""
    if interval is None or interval.get("ci_low") is None:
        return "not measured"
    low, high = interval["ci_low"], interval["ci_high"]
    if high - low <= 1e-12:
        return "no spread (zero-width interval): not an ordering"
    if low > 0:
        return f"{a} > {b}"
    if high < 0:
        return f"{a} < {b}"
    return "not resolved (interval contains 0)"


def min_detectable_difference(n: int, p: float = 0.5, alpha_z: float = Z975, power_z: float = Z80) -> float:
    """The smallest accuracy difference (a share) that two arms scored on the same ``n`` problems detect with 80%
    power at the two-sided 5% level, by the normal approximation for two proportions near ``p``:
    ``(z_0.975 + z_0.8) * sqrt(2 p (1 - p) / n)``, and never below one problem (``1 / n``). Pairing on problems
    only helps when the arms agree on most of them, so this is the conservative figure."""
    if n < 1:
        raise ValueError(f"min_detectable_difference: n={n} must be at least 1")
    p = min(max(p, 0.0), 1.0)
    return max((alpha_z + power_z) * math.sqrt(2.0 * p * (1.0 - p) / n), 1.0 / n)
