"""Configuration of `IDFTTrainer`: TRL's `SFTConfig` plus the token-loss family's fields."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import transformers
from packaging.version import Version
from transformers import TrainingArguments
from trl import SFTConfig

from trl_onpolicy.losses import EAFT_ENTROPY_MODES, IDFT_DETACH_MODES, TOKEN_LOSS_TYPES
from trl_onpolicy.utils.device import default_bf16_for_machine
from trl_onpolicy.utils.validation import check_training_arguments


@dataclass
class IDFTConfig(SFTConfig):
    r"""
    Configuration class for [`IDFTTrainer`]: every [`~trl.SFTConfig`] field, plus the fields below.

    Using [`~transformers.HfArgumentParser`] (or TRL's `TrlParser`) these fields can be given on the command line or in
    a YAML recipe.

    Parameters:
        > Token loss

        token_loss (`str`, *optional*, defaults to `"idft"`):
            Token loss to train with (left unset, it is `"dft"` when TRL's `loss_type="dft"` is set, else `"idft"`).
            Every choice is a weighted NLL `-w_t * log p_t` with a detached weight:

            - `"idft"`: In-Distribution Finetuning, `w = p ** gamma`, `gamma = clamp(exp(-phi / beta), gamma_min,
              gamma_max)`, `phi = log p + H` (https://huggingface.co/papers/2602.12222).
            - `"dft"`: Dynamic Fine-Tuning, `w = p` (identical to `SFTConfig(loss_type="dft")`).
            - `"eaft"`: Entropy-Adaptive Fine-Tuning, `w = normalised entropy` (see `eaft_entropy`).
            - `"nll"`: plain SFT, `w = 1` (identical to `SFTConfig(loss_type="nll")`).

        > IDFT

        idft_beta (`float`, *optional*, defaults to `1.0`):
            Temperature of the gamma map `exp(-phi / beta)`; must be > 0. Larger values keep gamma closer to 1 (DFT).
        idft_gamma_min (`float`, *optional*, defaults to `0.1`):
            Lower clamp of gamma, reached by over-confident tokens (`phi >= beta * ln(1 / gamma_min)`). Must be >= 0.
        idft_gamma_max (`float`, *optional*, defaults to `2.0`):
            Upper clamp of gamma, reached by off-policy tokens (`phi <= -beta * ln(gamma_max)`). Must be >=
            `idft_gamma_min`.
        idft_warmup_ratio (`float`, *optional*, defaults to `0.0`):
            Fraction of `max_steps` during which the schedule `lambda` is 0, i.e. gamma = 1 (DFT, not SFT).
        idft_transition_ratio (`float`, *optional*, defaults to `0.0`):
            Fraction of `max_steps` after the warm-up over which `lambda` rises linearly from 0 to 1. With
            `idft_warmup_ratio`, must sum to at most 1. The schedule follows `state.global_step / state.max_steps`,
            so it continues where it was after `resume_from_checkpoint`.
        idft_detach (`str`, *optional*, defaults to `"weight"`):
            What IDFT detaches. `"weight"` (current method): `-sg(p ** gamma) * log p`. `"gamma"` (the paper's first
            version, for reproducing its figure): `-p ** sg(gamma) * log p`, whose gradient pushes targets with `p <
            exp(-1 / gamma)` down.

        > EAFT

        eaft_entropy (`str`, *optional*, defaults to `"topk"`):
            Entropy EAFT weights by. `"topk"` (the EAFT paper): entropy of the softmax renormalised over the
            `eaft_top_k` largest logits, divided by `ln(eaft_top_k)`. `"full"` (the IDFT authors' baseline):
            full-vocabulary entropy divided by `ln |V|`.
        eaft_top_k (`int`, *optional*, defaults to `20`):
            `k` of `eaft_entropy="topk"`; must be >= 2.

    > Defaults that differ from [`~trl.SFTConfig`]: `bf16` left unset defaults to `True` as in SFTConfig when an
    > accelerator is used, and to `False` (float32) with `use_cpu=True` or on a machine without one, where SFTConfig's
    > default fails. An explicit `bf16`/`fp16` behaves as in SFTConfig.

    TRL's `loss_type` is honoured: `"nll"` (default) leaves the choice to `token_loss`, `"dft"` means
    `token_loss="dft"` (so `SFTConfig(loss_type="dft")` swaps in unchanged). Combinations the trainer cannot honour
    raise a `ValueError` naming the field: `loss_type="dft"` with another `token_loss`, `label_smoothing_factor > 0`,
    and sequence or context parallelism in `parallelism_config`.
    """

    token_loss: str | None = field(
        default=None,
        metadata={
            "help": "Token loss: 'idft' (default), 'dft', 'eaft' or 'nll' (plain SFT). Unset with TRL's "
            "loss_type='dft' it is 'dft'.",
            "choices": list(TOKEN_LOSS_TYPES),
        },
    )
    idft_beta: float = field(default=1.0, metadata={"help": "IDFT beta in gamma = clamp(exp(-phi/beta), ...); > 0."})
    idft_gamma_min: float = field(default=0.1, metadata={"help": "Lower clamp of IDFT's gamma (>= 0)."})
    idft_gamma_max: float = field(default=2.0, metadata={"help": "Upper clamp of IDFT's gamma (>= idft_gamma_min)."})
    idft_warmup_ratio: float = field(
        default=0.0, metadata={"help": "Fraction of max_steps with lambda = 0 (gamma = 1, i.e. DFT)."}
    )
    idft_transition_ratio: float = field(
        default=0.0, metadata={"help": "Fraction of max_steps over which lambda ramps linearly from 0 to 1."}
    )
    idft_detach: str = field(
        default="weight",
        metadata={"help": "'weight': -sg(p^gamma) log p (current); 'gamma': -p^sg(gamma) log p (paper v1).", "choices": list(IDFT_DETACH_MODES)},
    )
    eaft_entropy: str = field(
        default="topk",
        metadata={"help": "'topk': top-k renormalised entropy / ln k (EAFT paper); 'full': H / ln|V|.", "choices": list(EAFT_ENTROPY_MODES)},
    )
    eaft_top_k: int = field(default=20, metadata={"help": "k for eaft_entropy='topk' (>= 2)."})

    def __post_init__(self):
        check_training_arguments(self)  # every numeric field, TRL's and ours: finite and in range
        default_bf16_for_machine(self)
        self._validate_token_loss()
        super().__post_init__()

    def _validate_token_loss(self):
        def bad(field_name, value, why):
            raise ValueError(f"IDFTConfig.{field_name}={value!r} is invalid: {why}")

        # TRL's loss_type="dft" is our token_loss="dft"; deprecated "chunked_nll" is "nll" (SFTConfig maps it)
        if self.loss_type == "dft":
            if self.token_loss not in (None, "dft"):
                bad("token_loss", self.token_loss, "it contradicts loss_type='dft' (DFT); drop one of the two.")
            self.token_loss = "dft"
        elif self.loss_type not in ("nll", "chunked_nll"):
            bad("loss_type", self.loss_type, "TRL's loss_type is 'nll' or 'dft'; choose other losses with token_loss.")
        if self.token_loss is None:
            self.token_loss = "idft"

        if self.token_loss not in TOKEN_LOSS_TYPES:
            bad("token_loss", self.token_loss, f"choose one of {list(TOKEN_LOSS_TYPES)}.")
        if self.idft_detach not in IDFT_DETACH_MODES:
            bad("idft_detach", self.idft_detach, f"choose one of {list(IDFT_DETACH_MODES)}.")
        if self.eaft_entropy not in EAFT_ENTROPY_MODES:
            bad("eaft_entropy", self.eaft_entropy, f"choose one of {list(EAFT_ENTROPY_MODES)}.")
        if not self.eaft_top_k >= 2:
            bad("eaft_top_k", self.eaft_top_k, "the top-k entropy needs k >= 2 (the paper uses 20).")
        if not self.idft_beta > 0:
            bad("idft_beta", self.idft_beta, "beta divides phi and must be > 0 (the paper uses 1.0).")
        for name in ("idft_gamma_min", "idft_gamma_max"):
            if not getattr(self, name) >= 0:
                bad(name, getattr(self, name), "gamma is an exponent of p and must be >= 0.")
        if self.idft_gamma_min > self.idft_gamma_max:
            bad("idft_gamma_min", self.idft_gamma_min, f"it exceeds idft_gamma_max={self.idft_gamma_max}.")
        for name in ("idft_warmup_ratio", "idft_transition_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                bad(name, getattr(self, name), "a fraction of training must lie in [0, 1].")
        if self.idft_warmup_ratio + self.idft_transition_ratio > 1.0:
            bad(
                "idft_transition_ratio",
                self.idft_transition_ratio,
                f"idft_warmup_ratio + idft_transition_ratio = {self.idft_warmup_ratio + self.idft_transition_ratio} > 1.",
            )
        pc = self.parallelism_config
        if pc is not None and (getattr(pc, "sp_enabled", False) or getattr(pc, "cp_enabled", False)):
            bad(
                "parallelism_config",
                f"sp_size={getattr(pc, 'sp_size', None)}, cp_size={getattr(pc, 'cp_size', None)}",
                "IDFTTrainer does not support sequence or context parallelism (the model reduces the loss itself "
                "there); set sp_size=1 and cp_size=1.",
            )
        if self.label_smoothing_factor:
            bad("label_smoothing_factor", self.label_smoothing_factor, "label smoothing is not part of the token-loss family; set it to 0.")


def to_idft_config(args) -> IDFTConfig:
    """``args`` as an `IDFTConfig`: returned as is when it is one; a `transformers.TrainingArguments` or a
    `trl.SFTConfig` is converted the way `SFTTrainer` converts a `TrainingArguments` (every field it has carries over,
    the token-loss fields take their defaults, ``loss_type="dft"`` becomes ``token_loss="dft"``), with a one-line
    warning."""
    if isinstance(args, IDFTConfig):
        return args
    if not isinstance(args, TrainingArguments):
        raise TypeError(f"args must be an IDFTConfig, SFTConfig or TrainingArguments, got {type(args).__name__}.")
    dict_args = args.to_dict()
    for key in dict_args:  # to_dict hides every *_token value (hub_token, and SFTConfig's eos_token/pad_token)
        if key.endswith("_token"):
            dict_args[key] = getattr(args, key)
    if dict_args.get("parallelism_config") is not None:  # to_dict writes it as JSON
        dict_args["parallelism_config"] = args.parallelism_config
    if Version(transformers.__version__) < Version("5.0.0"):
        dict_args.pop("push_to_hub_token", None)
    config = IDFTConfig(**dict_args)
    warnings.warn(
        f"IDFTTrainer converted the {type(args).__name__} to an IDFTConfig with token_loss={config.token_loss!r} and "
        "default IDFT fields; pass an IDFTConfig to set them.",
        UserWarning,
        stacklevel=3,
    )
    return config
