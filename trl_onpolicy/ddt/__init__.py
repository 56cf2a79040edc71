"""DDT: how on-policy a dataset is for a model (centered log-likelihood phi per token, per sample, per corpus).

Modules, from pure math to I/O: `statistics` (NumPy aggregates), `encoding` (dataset rows -> token ids and scored
mask, as TRL's SFTTrainer tokenizes them), `scoring` (the model pass), `filter` (keep/drop rows), `plot` (PNG).
Every public name of the former single module ``trl_onpolicy.ddt`` is importable from here.
"""

from trl_onpolicy.ddt.encoding import (
    FORMATS,
    SKIP_REASONS,
    Encoder,
    SkipSample,
    check_some_row_scores,
    check_tokenizer_fits,
    detect_format,
    output_vocab_size,
)
from trl_onpolicy.ddt.filter import FILTER_STATISTICS, filter_dataset, filter_mask
from trl_onpolicy.ddt.plot import plot_phi_distribution
from trl_onpolicy.ddt.scoring import DDTResult, sample_own_responses, score_dataset, score_token_ids
from trl_onpolicy.ddt.statistics import (
    HIST_BINS,
    HIST_RANGE,
    PHI_QUANTILES,
    THRESHOLDS,
    corpus_summary,
    frac_key,
    histogram,
    json_safe,
    sample_statistics,
    worst_tokens,
)

__all__ = [
    "DDTResult", "Encoder", "FILTER_STATISTICS", "FORMATS", "HIST_BINS", "HIST_RANGE", "PHI_QUANTILES", "SKIP_REASONS",
    "SkipSample", "THRESHOLDS", "check_some_row_scores", "check_tokenizer_fits", "corpus_summary", "detect_format",
    "filter_dataset", "filter_mask", "frac_key", "histogram", "json_safe", "output_vocab_size", "plot_phi_distribution",
    "sample_own_responses", "sample_statistics", "score_dataset", "score_token_ids", "worst_tokens",
]
