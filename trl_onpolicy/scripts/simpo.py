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

from .common import (
    PREFERENCE_COLUMNS,
    check_columns,
    check_required,
    common_plan,
    describe_model_config,
    load_splits,
    make_parser,
    model_init_kwargs,
    no_accelerator,
    parse_recipe,
    print_plan,
    resolve_model,
    run_main,
    train_and_finish,
    world_size,
)

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
        if self.bf16 is None and not self.fp16 and (self.use_cpu or no_accelerator()):
            self.bf16 = False
        super().__post_init__()


def make_simpo_parser():
    return make_parser(SimPOConfig, PROG)


def main(argv: list[str] | None = None) -> int:
    def body():
        script_args, training_args, model_args, dataset_args, run_args = parse_recipe(make_simpo_parser(), argv)
        check_required(script_args, model_args, dataset_args)
        model_path, model_desc = resolve_model(model_args.model_name_or_path, dry_run=run_args.dry_run)
        need_eval = training_args.eval_strategy != "no"
        train, evaluation, data_desc = load_splits(script_args, dataset_args, need_eval, run_args.dry_run)
        if train is not None:
            check_columns(train, PREFERENCE_COLUMNS, "training")
        if evaluation is not None:
            check_columns(evaluation, PREFERENCE_COLUMNS, "evaluation")
        loss = f"simpo (beta {training_args.beta}, gamma {training_args.simpo_gamma}, cpo_alpha {training_args.cpo_alpha})"

        if run_args.dry_run:
            if model_path is not None:
                model_desc += ": " + describe_model_config(model_path, model_args)
            plan = {"trainer": "trl.experimental.cpo.CPOTrainer", "loss": loss, "reference": "none (SimPO is reference-free)"}
            plan.update(common_plan(model_desc, data_desc, train, evaluation, training_args, model_args, run_args.dry_run_num_processes, script_args.dataset_train_split))
            print_plan(PROG, plan)
            return 0

        from trl import get_peft_config
        from trl.experimental.cpo import CPOTrainer

        kwargs = model_init_kwargs(model_args, training_args, with_quantization=True)
        if world_size() > 1 or kwargs.get("quantization_config") is None:
            kwargs.setdefault("device_map", None)  # CPOTrainer defaults to device_map="auto", wrong under DDP/ZeRO
        training_args.model_init_kwargs = kwargs
        trainer = CPOTrainer(
            model=model_path,
            args=training_args,
            train_dataset=train,
            eval_dataset=evaluation,
            peft_config=get_peft_config(model_args),
        )
        trainer.accelerator.print(f"[trl-onpolicy] SimPO: {model_desc}; data: {data_desc}; {loss}")
        train_and_finish(trainer, training_args, script_args.dataset_name)
        return 0

    return run_main(body, PROG)


if __name__ == "__main__":
    import sys

    sys.exit(main())
