"""`trl-onpolicy train`: supervised fine-tuning with the token-loss family (IDFT, DFT, EAFT, plain SFT) from a recipe.

```bash
trl-onpolicy train --config recipes/quickstart/cpu_idft.yaml
accelerate launch --config_file recipes/accelerate/zero3.yaml scripts/train.py \\
    --config recipes/qwen2.5-math-7b/idft.yaml --learning_rate 5e-5
```

The recipe holds any field of TRL's `ScriptArguments` (dataset_name, dataset_train_split, ...), of
`trl_onpolicy.IDFTConfig` (every `SFTConfig` field plus token_loss, idft_beta, ...), of TRL's `ModelConfig`
(model_name_or_path, dtype, attn_implementation, use_peft/lora_*, load_in_4bit, ...), of TRL's `DatasetMixtureConfig`
(datasets, test_split_size) and ``dry_run``. Command-line flags override the recipe.
"""

from __future__ import annotations

from .common import (
    SFT_COLUMNS,
    RecipeError,
    check_columns,
    check_required,
    common_plan,
    describe_model_config,
    load_splits,
    make_parser,
    model_init_kwargs,
    parse_recipe,
    print_plan,
    resolve_model,
    run_main,
    train_and_finish,
)

PROG = "trl-onpolicy train"


def make_train_parser():
    from trl_onpolicy.idft_config import IDFTConfig

    return make_parser(IDFTConfig, PROG)


def token_loss_summary(args) -> str:
    if args.token_loss == "idft":
        return (
            f"idft (beta {args.idft_beta}, gamma in [{args.idft_gamma_min}, {args.idft_gamma_max}], warmup "
            f"{args.idft_warmup_ratio}, transition {args.idft_transition_ratio}, detach {args.idft_detach})"
        )
    if args.token_loss == "eaft":
        return f"eaft (entropy {args.eaft_entropy}" + (f", top-k {args.eaft_top_k})" if args.eaft_entropy == "topk" else ")")
    return {"dft": "dft (weight p)", "nll": "nll (plain SFT)"}[args.token_loss]


def main(argv: list[str] | None = None) -> int:
    def body():
        parser = make_train_parser()
        script_args, training_args, model_args, dataset_args, run_args = parse_recipe(parser, argv)
        check_required(script_args, model_args, dataset_args)
        model_path, model_desc = resolve_model(model_args.model_name_or_path, dry_run=run_args.dry_run)
        need_eval = training_args.eval_strategy != "no"
        train, evaluation, data_desc = load_splits(script_args, dataset_args, need_eval, run_args.dry_run)
        if train is not None:
            check_columns(train, SFT_COLUMNS, "training")
        if evaluation is not None:
            check_columns(evaluation, SFT_COLUMNS, "evaluation")

        if run_args.dry_run:
            if model_path is not None:
                model_desc += ": " + describe_model_config(model_path, model_args)
            plan = {"trainer": "trl_onpolicy.IDFTTrainer", "token loss": token_loss_summary(training_args)}
            plan.update(common_plan(model_desc, data_desc, train, evaluation, training_args, model_args, run_args.dry_run_num_processes, script_args.dataset_train_split))
            plan["max_length"] = f"{training_args.max_length} (packing={training_args.packing}, padding_free={training_args.padding_free})"
            print_plan(PROG, plan)
            return 0

        from trl import get_peft_config, get_quantization_config

        from trl_onpolicy.idft_trainer import IDFTTrainer

        training_args.model_init_kwargs = model_init_kwargs(model_args, training_args)
        trainer = IDFTTrainer(
            model=model_path,
            args=training_args,
            train_dataset=train,
            eval_dataset=evaluation,
            peft_config=get_peft_config(model_args),
            quantization_config=get_quantization_config(model_args),
        )
        trainer.accelerator.print(f"[trl-onpolicy] {model_desc}; data: {data_desc}; token loss: {token_loss_summary(training_args)}")
        train_and_finish(trainer, training_args, script_args.dataset_name)
        return 0

    return run_main(body, PROG)


__all__ = ["main", "make_train_parser", "RecipeError"]

if __name__ == "__main__":
    import sys

    sys.exit(main())
