"""trl-onpolicy: on-policy supervised fine-tuning for Hugging Face TRL.

`IDFTConfig`/`IDFTTrainer` swap in for `SFTConfig`/`SFTTrainer`; the token-loss math is in `trl_onpolicy.losses`.
Heavier parts (DDT scoring, Hinted Decoding, evaluation) are imported lazily.
"""

from importlib import import_module

__version__ = "0.1.0"

_LAZY = {
    "IDFTConfig": "idft_config",
    "IDFTTrainer": "idft_trainer",
    "hinted_decode": "hinted",
    "HintedDataCollator": "hinted_online",
    "OnlineIDFTTrainer": "hinted_online",
    "OnlineSFTTrainer": "hinted_online",
    "score_dataset": "ddt",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'trl_onpolicy' has no attribute {name!r}")
