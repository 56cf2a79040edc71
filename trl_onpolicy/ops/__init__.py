"""Token statistics over the LM head, computed in vocabulary tiles (no [B, T, V] logits)."""

from .lm_head import (DEFAULT_TILES, backbone, capture_hidden_states, default_tiles, full_softmax_statistics,
                      full_tensor, lm_head_transform, token_statistics)

__all__ = ["DEFAULT_TILES", "backbone", "capture_hidden_states", "default_tiles", "full_softmax_statistics",
           "full_tensor", "lm_head_transform", "token_statistics"]
