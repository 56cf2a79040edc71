"""DDT filtering: keep or drop dataset rows by a per-sample statistic of `trl_onpolicy.ddt.scoring.score_dataset`."""

from __future__ import annotations

import math
from collections.abc import Sequence

from trl_onpolicy.ddt.scoring import DDTResult
from trl_onpolicy.ddt.statistics import THRESHOLDS, frac_key

FILTER_STATISTICS = ("mean_phi", "z", "sum_phi", "num_tokens") + tuple(frac_key(t) for t in THRESHOLDS)


def filter_mask(
    samples: Sequence[dict],
    by: str = "mean_phi",
    min_value: float | None = None,
    max_value: float | None = None,
    *,
    invert: bool = False,
    keep_unscored: bool = False,
) -> list[bool]:
    """Which rows to keep: those whose statistic ``by`` lies in ``[min_value, max_value]`` (``invert`` keeps the
    others). Unscored rows (skipped, or a NaN statistic) are dropped unless ``keep_unscored``."""
    if by not in FILTER_STATISTICS:
        raise ValueError(f"Cannot filter by {by!r}; choose one of {FILTER_STATISTICS}.")
    if min_value is None and max_value is None:
        raise ValueError("Give min_value and/or max_value to filter by.")
    if min_value is not None and max_value is not None and min_value > max_value:
        raise ValueError(f"min_value={min_value} is larger than max_value={max_value}.")
    keep = []
    for s in samples:
        value = s.get(by) if not s.get("skipped") else None
        if value is None or (isinstance(value, float) and not math.isfinite(value)):
            keep.append(keep_unscored)
            continue
        inside = (min_value is None or value >= min_value) and (max_value is None or value <= max_value)
        keep.append(inside != invert)
    return keep


def filter_dataset(dataset, samples: Sequence[dict] | DDTResult, **criteria):
    """Keep the rows of ``dataset`` selected by `filter_mask` (same columns, same order).

    ``samples`` are the per-row records of `score_dataset` (or a `DDTResult`), aligned with the rows by ``index``.
    Returns ``(filtered_dataset, report)``; the report counts ``num_rows``, ``kept``, ``dropped`` and
    ``dropped_unscored``.
    """
    if isinstance(samples, DDTResult):
        samples = samples.samples
    samples = sorted(samples, key=lambda s: s["index"])
    if len(samples) != len(dataset) or any(s["index"] != i for i, s in enumerate(samples)):
        raise ValueError(
            f"The scores cover {len(samples)} rows but the dataset has {len(dataset)}: score the same dataset "
            "(without --num_samples) before filtering it."
        )
    keep = filter_mask(samples, **criteria)
    unscored = sum(1 for s, k in zip(samples, keep) if not k and (s.get("skipped") or not _finite(s.get(criteria.get("by", "mean_phi")))))
    indices = [i for i, k in enumerate(keep) if k]
    filtered = [dataset[i] for i in indices] if isinstance(dataset, list) else dataset.select(indices)
    report = {
        "num_rows": len(samples),
        "kept": len(indices),
        "dropped": len(samples) - len(indices),
        "dropped_unscored": unscored,
        "criteria": {k: v for k, v in criteria.items()},
    }
    return filtered, report


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)

