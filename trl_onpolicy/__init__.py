"""trl-onpolicy: on-policy supervised fine-tuning for Hugging Face TRL.

`IDFTConfig`/`IDFTTrainer` swap in for `SFTConfig`/`SFTTrainer`; the token-loss math is in `trl_onpolicy.losses`.
Heavier parts (DDT scoring, Hinted Decoding, evaluation) are imported lazily. The folder map is in
docs/architecture.md.
"""

from importlib import import_module

from ._moved import install as _install_moved_modules

__version__ = "0.1.0"

_LAZY = {
    "IDFTConfig": "trainer.idft_config",
    "IDFTTrainer": "trainer.idft_trainer",
    "hinted_decode": "hinted.decoding",
    "HintedDataCollator": "trainer.online",
    "OnlineIDFTTrainer": "trainer.idft_trainer",
    "OnlineSFTTrainer": "trainer.online",
    "score_dataset": "ddt.scoring",
}

__all__ = sorted(_LAZY) + ["__version__"]

_install_moved_modules()


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'trl_onpolicy' has no attribute {name!r}")
