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
)

PROG = "trl-onpolicy dpo"


@dataclass
class DPOScriptConfig(DPOConfig):
    """TRL's [`~trl.DPOConfig`], except that an unset ``bf16`` is False on a machine without an accelerator (TRL's
    bf16 default refuses to start there), as in `IDFTConfig`."""

    def __post_init__(self):
        if self.bf16 is None and not self.fp16 and (self.use_cpu or no_accelerator()):
            self.bf16 = False
        super().__post_init__()


def make_dpo_parser():
    return make_parser(DPOScriptConfig, PROG)


def main(argv: list[str] | None = None) -> int:
    def body():
        script_args, training_args, model_args, dataset_args, run_args = parse_recipe(make_dpo_parser(), argv)
        check_required(script_args, model_args, dataset_args)
        model_path, model_desc = resolve_model(model_args.model_name_or_path, dry_run=run_args.dry_run)
        need_eval = training_args.eval_strategy != "no"
        train, evaluation, data_desc = load_splits(script_args, dataset_args, need_eval, run_args.dry_run)
        if train is not None:
            check_columns(train, PREFERENCE_COLUMNS, "training")
        if evaluation is not None:
            check_columns(evaluation, PREFERENCE_COLUMNS, "evaluation")

        if run_args.dry_run:
            if model_path is not None:
                model_desc += ": " + describe_model_config(model_path, model_args)
            plan = {
                "trainer": "trl.DPOTrainer",
                "loss": f"{training_args.loss_type} (beta {training_args.beta})",
                "reference": "base model with the LoRA adapter disabled" if model_args.use_peft else f"a frozen copy loaded from {model_args.model_name_or_path}",
            }
            plan.update(common_plan(model_desc, data_desc, train, evaluation, training_args, model_args, run_args.dry_run_num_processes, script_args.dataset_train_split))
            print_plan(PROG, plan)
            return 0

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
            import torch

            trainer.model._ddp_params_and_buffers_to_ignore = [
                name for name, buffer in trainer.model.named_buffers() if buffer.dtype == torch.bool
            ]
        trainer.accelerator.print(f"[trl-onpolicy] DPO: {model_desc}; data: {data_desc}; loss {training_args.loss_type}")
        train_and_finish(trainer, training_args, script_args.dataset_name)
        return 0

    return run_main(body, PROG)


if __name__ == "__main__":
    import sys

    sys.exit(main())
