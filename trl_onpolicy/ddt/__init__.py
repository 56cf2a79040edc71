"""DDT: how on-policy a dataset is for a model (centered log-likelihood phi per token, per sample, per corpus)."""

from .scoring import DDTResult, filter_dataset, filter_mask, score_dataset, score_token_ids

__all__ = ["DDTResult", "filter_dataset", "filter_mask", "score_dataset", "score_token_ids"]
