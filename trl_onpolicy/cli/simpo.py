"""`trl-onpolicy simpo`: SimPO (Meng et al., 2024) with TRL's experimental `CPOTrainer`, from a recipe.

SimPO is `CPOConfig(loss_type="simpo", cpo_alpha=0.0)`: a length-normalised, reference-free preference loss with a
target margin ``simpo_gamma``. TRL's default ``cpo_alpha=1.0`` adds an NLL term on the chosen responses (that is
"CPO-SimPO", not SimPO), so `SimPOConfig` defaults to ``cpo_alpha=0`` and refuses any other value: train CPO-SimPO
with TRL's own CPO script if that is what you want.

```bash
trl-onpolicy simpo --config recipes/qwen2.5-math-1.5b/simpo.yaml
```
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from trl_onpolicy.utils.device import default_bf16_for_machine
from trl_onpolicy.utils.validation import check_training_arguments
from trl_onpolicy.cli.loading import PREFERENCE_COLUMNS, model_init_kwargs
from trl_onpolicy.cli.recipe import make_parser, prepare_recipe, run_recipe, world_size

PROG = "trl-onpolicy simpo"
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from trl.experimental.cpo import CPOConfig  # noqa: E402


@dataclass
class SimPOConfig(CPOConfig):
    r"""
    [`~trl.experimental.cpo.CPOConfig`] fixed to pure SimPO.

    Parameters:
        loss_type (`str`, *optional*, defaults to `"simpo"`):
            Must be `"simpo"`.
        cpo_alpha (`float`, *optional*, defaults to `0.0`):
            Weight of CPO's NLL term; must be 0 for SimPO.
        beta (`float`, *optional*, defaults to `2.0`):
            SimPO's reward scale (the SimPO paper uses 2.0 to 2.5; TRL's CPO default is 0.1).
        simpo_gamma (`float`, *optional*, defaults to `1.0`):
            SimPO's target reward margin (gamma / beta = 0.5 with the default beta).
    """

    loss_type: str = field(default="simpo", metadata={"help": "Must be 'simpo' (this entry point trains pure SimPO)."})
    cpo_alpha: float = field(default=0.0, metadata={"help": "Must be 0: a non-zero value adds CPO's NLL term."})
    beta: float = field(default=2.0, metadata={"help": "SimPO reward scale beta (SimPO paper: 2.0-2.5)."})
    simpo_gamma: float = field(default=1.0, metadata={"help": "SimPO target reward margin gamma."})

    def __post_init__(self):
        if self.loss_type != "simpo":
            raise ValueError(
                f"SimPOConfig.loss_type={self.loss_type!r} is invalid: `trl-onpolicy simpo` trains SimPO only; remove "
                "loss_type from the recipe (for other CPO losses use TRL's CPOTrainer directly)."
            )
        if self.cpo_alpha != 0.0:
            raise ValueError(
                f"SimPOConfig.cpo_alpha={self.cpo_alpha!r} is invalid: pure SimPO has no NLL term; set cpo_alpha: 0 "
                "(cpo_alpha > 0 is CPO-SimPO, which this entry point does not train)."
            )
        check_training_arguments(self)  # every numeric field finite and in range (beta > 0: no inverted preference)
        default_bf16_for_machine(self)
        super().__post_init__()


def make_simpo_parser():
    return make_parser(SimPOConfig, PROG)


def describe(training_args, model_args) -> dict:
    loss = f"simpo (beta {training_args.beta}, gamma {training_args.simpo_gamma}, cpo_alpha {training_args.cpo_alpha})"
    return {"trainer": "trl.experimental.cpo.CPOTrainer", "loss": loss, "reference": "none (SimPO is reference-free)"}


def build_trainer(model_path, training_args, model_args, script_args, train, evaluation):
    from trl import get_peft_config
    from trl.experimental.cpo import CPOTrainer

    kwargs = model_init_kwargs(model_args, training_args, with_quantization=True)
    if world_size() > 1 or kwargs.get("quantization_config") is None:
        kwargs.setdefault("device_map", None)  # CPOTrainer defaults to device_map="auto", wrong under DDP/ZeRO
    training_args.model_init_kwargs = kwargs
    return CPOTrainer(
        model=model_path,
        args=training_args,
        train_dataset=train,
        eval_dataset=evaluation,
        peft_config=get_peft_config(model_args),
    )


def prepare(argv: list[str] | None = None) -> dict:
    """Parse a recipe and load and prepare its data exactly as `main` does, without building the trainer (see
    `trl_onpolicy.cli.recipe.prepare_recipe`; pass the result's fields to `build_trainer`)."""
    return prepare_recipe(make_simpo_parser(), argv, PREFERENCE_COLUMNS, None)


def main(argv: list[str] | None = None) -> int:
    return run_recipe(PROG, make_simpo_parser(), argv, PREFERENCE_COLUMNS, describe, build_trainer)


if __name__ == "__main__":
    import sys

    sys.exit(main())
