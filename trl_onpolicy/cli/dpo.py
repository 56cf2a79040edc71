"""`trl-onpolicy dpo`: Direct Preference Optimization with TRL's `DPOTrainer`, from a recipe.

```bash
trl-onpolicy dpo --config recipes/qwen2.5-math-1.5b/dpo.yaml
accelerate launch --config_file recipes/accelerate/zero3.yaml scripts/dpo.py --config recipes/qwen2.5-math-7b/dpo.yaml
```

The data needs ``chosen`` and ``rejected`` (and usually ``prompt``) columns, e.g. the pairs written by
`trl-onpolicy pairs`. The reference model is the initial policy: it is loaded from the same ``model_name_or_path``
(local folder or Hub name) by `DPOTrainer` itself, or, with LoRA, is the base model with the adapter disabled.
"""

from __future__ import annotations

from dataclasses import dataclass

from trl import DPOConfig

from trl_onpolicy.utils.device import default_bf16_for_machine
from trl_onpolicy.utils.validation import check_training_arguments
from trl_onpolicy.cli.loading import PREFERENCE_COLUMNS, model_init_kwargs
from trl_onpolicy.cli.recipe import make_parser, prepare_recipe, run_recipe

PROG = "trl-onpolicy dpo"


@dataclass
class DPOScriptConfig(DPOConfig):
    """TRL's [`~trl.DPOConfig`], except that an unset ``bf16`` is False on a machine without an accelerator (TRL's
    bf16 default refuses to start there), as in `IDFTConfig`."""

    def __post_init__(self):
        check_training_arguments(self)  # every numeric field finite and in range (beta > 0: no inverted preference)
        default_bf16_for_machine(self)
        super().__post_init__()


def make_dpo_parser():
    return make_parser(DPOScriptConfig, PROG)


def describe(training_args, model_args) -> dict:
    reference = (
        "base model with the LoRA adapter disabled"
        if model_args.use_peft
        else f"a frozen copy loaded from {model_args.model_name_or_path}"
    )
    return {"trainer": "trl.DPOTrainer", "loss": f"{training_args.loss_type} (beta {training_args.beta})", "reference": reference}


def build_trainer(model_path, training_args, model_args, script_args, train, evaluation):
    import torch
    from trl import DPOTrainer, get_peft_config, get_quantization_config

    training_args.model_init_kwargs = model_init_kwargs(model_args, training_args)
    # ref_model=None with a path: DPOTrainer loads the reference from the same path (or, with PEFT, disables the
    # adapter); it never has to guess a name from an in-memory model
    trainer = DPOTrainer(
        model=model_path,
        ref_model=None,
        args=training_args,
        train_dataset=train,
        eval_dataset=evaluation,
        peft_config=get_peft_config(model_args),
        quantization_config=get_quantization_config(model_args),
    )
    if script_args.ignore_bias_buffers:
        trainer.model._ddp_params_and_buffers_to_ignore = [
            name for name, buffer in trainer.model.named_buffers() if buffer.dtype == torch.bool
        ]
    return trainer


def prepare(argv: list[str] | None = None) -> dict:
    """Parse a recipe and load and prepare its data exactly as `main` does, without building the trainer (see
    `trl_onpolicy.cli.recipe.prepare_recipe`; pass the result's fields to `build_trainer`)."""
    return prepare_recipe(make_dpo_parser(), argv, PREFERENCE_COLUMNS, None)


def main(argv: list[str] | None = None) -> int:
    return run_recipe(PROG, make_dpo_parser(), argv, PREFERENCE_COLUMNS, describe, build_trainer)


if __name__ == "__main__":
    import sys

    sys.exit(main())
