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

Online on-policy SFT: ``hinted_online: true`` trains with `trl_onpolicy.HintedDataCollator`, which re-aligns every
batch with Hinted Decoding by the weights of the step that trains on it; each collator setting ``<name>`` is the
recipe field ``hinted_<name>`` (`trl_onpolicy.trainer.online.OnlineHintedArguments`, derived from `HintedSettings`).
The data then needs a question column and a reference column (``hinted_question_column``,
``hinted_reference_column``). See recipes/quickstart/cpu_idft_online.yaml.
"""

from __future__ import annotations

import dataclasses

from trl_onpolicy.cli.loading import SFT_COLUMNS, model_init_kwargs, prepare_sft_dataset
from trl_onpolicy.cli.recipe import make_parser, prepare_recipe, run_recipe
from trl_onpolicy.utils.errors import RecipeError

PROG = "trl-onpolicy train"


def make_train_parser():
    from trl_onpolicy.trainer.online import OnlineHintedArguments
    from trl_onpolicy.trainer.idft_config import IDFTConfig

    return make_parser(IDFTConfig, PROG, extra=(OnlineHintedArguments,))


def check_online(training_args, train, evaluation, hinted=None) -> None:
    """Refuse an online recipe that cannot run (bad settings, padding-free/packing, missing columns), and hinted_*
    settings given without ``hinted_online: true``, before any model is loaded."""
    if hinted is None:
        return
    from trl_onpolicy.trainer.online import HintedSettings

    if not hinted.hinted_online:
        changed = [f.name for f in dataclasses.fields(hinted)
                   if f.name != "hinted_online" and getattr(hinted, f.name) != f.default]
        if changed:
            raise RecipeError(f"{', '.join(changed)} set but hinted_online is false: set hinted_online: true to train "
                              "online with Hinted Decoding, or remove them.")
        return
    try:
        settings = HintedSettings(**hinted.collator_kwargs())
    except ValueError as e:
        raise RecipeError(str(e).replace("HintedDataCollator.", "hinted_", 1)) from e
    for name in ("padding_free", "packing"):
        if getattr(training_args, name):
            raise RecipeError(f"{name}: true cannot be combined with hinted_online: true (online Hinted Decoding "
                              "rebuilds each batch from whole samples); set it to false.")
    for dataset, what in ((train, "training"), (evaluation, "evaluation")):
        if dataset is None:
            continue
        missing = [c for c in (settings.question_column, settings.reference_column) if c not in dataset.column_names]
        if missing:
            raise RecipeError(
                f"hinted_online: the {what} dataset has no column(s) {missing} (it has {sorted(dataset.column_names)}); "
                "set hinted_question_column / hinted_reference_column to its question and reference columns."
            )


def online_summary(hinted) -> str:
    k = hinted.collator_kwargs()
    return (
        f"Hinted Decoding re-aligns every batch with the current weights (beta {k['beta']}, lambda {k['lambda_mode']}, "
        f"max_new_tokens {k['max_new_tokens']}, temperature {k['temperature']}, top_p {k['top_p']}, checker "
        f"{k['checker']}, on_reject {k['on_reject']}; columns {k['question_column']}/{k['reference_column']})"
    )


def token_loss_summary(args) -> str:
    if args.token_loss == "idft":
        return (
            f"idft (beta {args.idft_beta}, gamma in [{args.idft_gamma_min}, {args.idft_gamma_max}], warmup "
            f"{args.idft_warmup_ratio}, transition {args.idft_transition_ratio}, detach {args.idft_detach})"
        )
    if args.token_loss == "eaft":
        return f"eaft (entropy {args.eaft_entropy}" + (f", top-k {args.eaft_top_k})" if args.eaft_entropy == "topk" else ")")
    return {"dft": "dft (weight p)", "nll": "nll (plain SFT)"}[args.token_loss]


def describe(training_args, model_args, hinted=None) -> dict:
    online = hinted is not None and hinted.hinted_online
    plan = {
        "trainer": "trl_onpolicy.IDFTTrainer" + (" + HintedDataCollator (online)" if online else ""),
        "loss": token_loss_summary(training_args),
        "max_length": f"{training_args.max_length} (packing={training_args.packing}, padding_free={training_args.padding_free})",
        "trained tokens": _trained_tokens(training_args),
    }
    if online:
        plan["online"] = online_summary(hinted)
    return plan


def _trained_tokens(training_args) -> str:
    if training_args.assistant_only_loss:
        return "assistant turns (assistant_only_loss, TRL training chat template)"
    if training_args.completion_only_loss is False:
        return "EVERY token, prompt included (completion_only_loss: false)"
    return "completions only (`messages` rows are split into prompt = turns before the last assistant turn, completion = that turn)"


def build_trainer(model_path, training_args, model_args, script_args, train, evaluation, hinted=None):
    from trl import get_peft_config, get_quantization_config

    from trl_onpolicy.trainer.idft_trainer import IDFTTrainer

    training_args.model_init_kwargs = model_init_kwargs(model_args, training_args)
    extra = {}
    if hinted is not None and hinted.hinted_online:
        from transformers import AutoTokenizer

        from trl_onpolicy.trainer.online import HintedDataCollator

        tokenizer = AutoTokenizer.from_pretrained(
            model_path, revision=model_args.model_revision, trust_remote_code=training_args.trust_remote_code
        )
        extra = dict(processing_class=tokenizer, data_collator=HintedDataCollator(tokenizer, **hinted.collator_kwargs()))
    return IDFTTrainer(
        model=model_path,
        args=training_args,
        train_dataset=train,
        eval_dataset=evaluation,
        peft_config=get_peft_config(model_args),
        quantization_config=get_quantization_config(model_args),
        **extra,
    )


def prepare(argv: list[str] | None = None) -> dict:
    """Parse a recipe and load and prepare its data exactly as `main` does, without building the trainer (see
    `trl_onpolicy.cli.recipe.prepare_recipe`; pass the result's fields to `build_trainer`)."""
    return prepare_recipe(make_train_parser(), argv, SFT_COLUMNS, prepare_sft_dataset, check_online)


def main(argv: list[str] | None = None) -> int:
    return run_recipe(PROG, make_train_parser(), argv, SFT_COLUMNS, describe, build_trainer, prepare=prepare_sft_dataset,
                      check=check_online)


if __name__ == "__main__":
    import sys

    sys.exit(main())
