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

from .common import SFT_COLUMNS, make_parser, model_init_kwargs, prepare_recipe, prepare_sft_dataset, run_recipe

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


def describe(training_args, model_args) -> dict:
    return {
        "trainer": "trl_onpolicy.IDFTTrainer",
        "loss": token_loss_summary(training_args),
        "max_length": f"{training_args.max_length} (packing={training_args.packing}, padding_free={training_args.padding_free})",
        "trained tokens": _trained_tokens(training_args),
    }


def _trained_tokens(training_args) -> str:
    if training_args.assistant_only_loss:
        return "assistant turns (assistant_only_loss, TRL training chat template)"
    if training_args.completion_only_loss is False:
        return "EVERY token, prompt included (completion_only_loss: false)"
    return "completions only (`messages` rows are split into prompt = turns before the last assistant turn, completion = that turn)"


def build_trainer(model_path, training_args, model_args, script_args, train, evaluation):
    from trl import get_peft_config, get_quantization_config

    from trl_onpolicy.idft_trainer import IDFTTrainer

    training_args.model_init_kwargs = model_init_kwargs(model_args, training_args)
    return IDFTTrainer(
        model=model_path,
        args=training_args,
        train_dataset=train,
        eval_dataset=evaluation,
        peft_config=get_peft_config(model_args),
        quantization_config=get_quantization_config(model_args),
    )


def prepare(argv: list[str] | None = None) -> dict:
    """Parse a recipe and load and prepare its data exactly as `main` does, without building the trainer (see
    `trl_onpolicy.scripts.common.prepare_recipe`; pass the result's fields to `build_trainer`)."""
    return prepare_recipe(make_train_parser(), argv, SFT_COLUMNS, prepare_sft_dataset)


def main(argv: list[str] | None = None) -> int:
    return run_recipe(PROG, make_train_parser(), argv, SFT_COLUMNS, describe, build_trainer, prepare=prepare_sft_dataset)


if __name__ == "__main__":
    import sys

    sys.exit(main())
