"""DDT statistics: pure functions from per-token arrays (phi, varentropy, log p, entropy) to per-sample and corpus
aggregates, and the JSON form of the results. No model, no tokenizer: NumPy only."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import numpy as np

THRESHOLDS = (-1.0, -3.0, -5.0)
PHI_QUANTILES = (0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99)
HIST_RANGE = (-12.0, 4.0)
HIST_BINS = 64


def frac_key(threshold: float) -> str:
    return f"frac_phi_gt_{threshold:g}"



def sample_statistics(phi: np.ndarray, varentropy: np.ndarray, thresholds: Sequence[float] = THRESHOLDS) -> dict:
    """Aggregates of one sample's completion tokens.

    ``z = sum(phi) / sqrt(sum(varentropy))``: for text sampled from the model the phi_t are martingale differences
    with conditional variance varentropy_t, so z is approximately standard normal; off-policy text gives z << 0.
    It is NaN when the sum of varentropies is 0 (a fully deterministic model).
    """
    phi = np.asarray(phi, dtype=np.float64)
    var = np.asarray(varentropy, dtype=np.float64)
    n = int(phi.size)
    total, total_var = float(phi.sum()), float(var.sum())
    out = {
        "num_tokens": n,
        "mean_phi": total / n if n else float("nan"),
        "sum_phi": total,
        "sum_varentropy": total_var,
        "z": total / math.sqrt(total_var) if total_var > 0 else float("nan"),
    }
    for t in thresholds:
        out[frac_key(t)] = float((phi > t).mean()) if n else float("nan")
    return out


def _quantiles(x: np.ndarray, qs: Sequence[float]) -> dict:
    if x.size == 0:
        return {f"q{int(round(q * 100)):02d}": float("nan") for q in qs}
    values = np.quantile(x, qs)
    return {f"q{int(round(q * 100)):02d}": float(v) for q, v in zip(qs, values)}


def histogram(x: np.ndarray, value_range=HIST_RANGE, bins: int = HIST_BINS) -> dict:
    """Counts over ``bins`` equal bins of ``value_range``; values outside are counted in ``below``/``above``."""
    x = np.asarray(x, dtype=np.float64)
    counts, edges = np.histogram(np.clip(x, *value_range), bins=bins, range=value_range)
    return {
        "edges": [float(e) for e in edges],
        "counts": [int(c) for c in counts],
        "below": int((x < value_range[0]).sum()),
        "above": int((x > value_range[1]).sum()),
    }


def corpus_summary(
    token_arrays: Sequence[dict | None],
    samples: Sequence[dict],
    thresholds: Sequence[float] = THRESHOLDS,
) -> dict:
    """Corpus aggregates from per-sample token arrays (``None`` for skipped rows) and per-sample records.

    Token-level figures (``mean_phi``, ``std_phi``, quantiles, threshold fractions, histogram) weight every
    completion token equally; ``mean_z``/``mean_sample_phi`` average over samples; ``corpus_z`` is the z statistic
    of the whole corpus taken as one sequence (approx. N(0, 1) for the model's own samples).
    """
    scored = [a for a in token_arrays if a is not None]
    cat = lambda key: np.concatenate([a[key] for a in scored]).astype(np.float64) if scored else np.zeros(0)  # noqa: E731
    phi, var, lp, ent = cat("phi"), cat("varentropy"), cat("log_probs"), cat("entropy")
    n = int(phi.size)
    nan = float("nan")
    skipped = Counter(s["skipped"] for s in samples if s.get("skipped"))
    zs = np.array([s["z"] for s in samples if not s.get("skipped") and np.isfinite(s["z"])], dtype=np.float64)
    means = np.array([s["mean_phi"] for s in samples if not s.get("skipped")], dtype=np.float64)
    summary = {
        "num_samples": len(scored),
        "num_rows": len(samples),
        "num_skipped": int(sum(skipped.values())),
        "skipped": dict(sorted(skipped.items())),
        "num_tokens": n,
        "mean_phi": float(phi.mean()) if n else nan,
        "std_phi": float(phi.std()) if n else nan,
        "min_phi": float(phi.min()) if n else nan,
        "max_phi": float(phi.max()) if n else nan,
        "phi_quantiles": _quantiles(phi, PHI_QUANTILES),
        "mean_log_prob": float(lp.mean()) if n else nan,
        "mean_entropy": float(ent.mean()) if n else nan,
        "mean_varentropy": float(var.mean()) if n else nan,
        "corpus_z": float(phi.sum() / math.sqrt(var.sum())) if n and var.sum() > 0 else nan,
        "mean_z": float(zs.mean()) if zs.size else nan,
        "std_z": float(zs.std()) if zs.size else nan,
        "z_quantiles": _quantiles(zs, PHI_QUANTILES),
        "mean_sample_phi": float(means.mean()) if means.size else nan,
        "std_sample_phi": float(means.std()) if means.size else nan,
        "sample_phi_quantiles": _quantiles(means, PHI_QUANTILES),
        "mean_tokens_per_sample": n / len(scored) if scored else nan,
    }
    for t in thresholds:
        summary[frac_key(t)] = float((phi > t).mean()) if n else nan
    summary["phi_histogram"] = histogram(phi)
    summary["sample_phi_histogram"] = histogram(means, value_range=(-6.0, 2.0), bins=64)
    return summary



def worst_tokens(arrays: dict, tokenizer, k: int) -> list[dict]:
    """The ``k`` completion tokens with the lowest phi: decoded text, phi, log p, entropy and index in the completion."""
    if k <= 0 or arrays["phi"].size == 0:
        return []
    idx = np.argsort(arrays["phi"], kind="stable")[:k]
    out = []
    for j in idx:
        out.append(
            {
                "token": tokenizer.decode([int(arrays["token_ids"][j])]) if tokenizer is not None else None,
                "token_id": int(arrays["token_ids"][j]),
                "index": int(j),
                "phi": float(arrays["phi"][j]),
                "log_prob": float(arrays["log_probs"][j]),
                "entropy": float(arrays["entropy"][j]),
            }
        )
    return out



def json_safe(obj):
    """``obj`` with NaN/inf floats as None and NumPy scalars as Python numbers, for ``json.dumps``."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        return json_safe(obj.item())
    return obj

