"""Shared plumbing of the training entry points (`trl-onpolicy train|dpo|simpo`, `scripts/*.py`).

Each entry point parses a recipe with TRL's `TrlParser` (``--config recipe.yaml``, command-line flags override the
YAML, a top-level ``env:`` block is exported) into TRL's `ScriptArguments`, the trainer's config class, TRL's
`ModelConfig`, TRL's `DatasetMixtureConfig` and this module's `RunArguments`. This module adds what `TrlParser` leaves
out: unknown or misspelled keys stop with an error naming them (with the closest valid key), missing required keys
stop with an error, datasets may be a Hub name, a local folder or a local file, and ``--dry_run`` resolves model,
data and config without downloading or training. Model and data loading is `trl_onpolicy.cli.loading`, the
checkpoint helpers `trl_onpolicy.cli.checkpoints`; their names are importable from here too.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

# the model and data loading and the checkpoint helpers live in their own modules; their names stay importable here
from trl_onpolicy.cli.checkpoints import (  # noqa: F401
    CHECKPOINT_WEIGHTS, checkpoint_is_complete, last_complete_checkpoint, resume_arg,
)
from trl_onpolicy.cli.loading import (  # noqa: F401
    PREFERENCE_COLUMNS, SFT_COLUMNS, check_columns, describe_model_config, generator_kwargs, is_local, is_offline_source,
    load_split, load_splits, looks_local, model_init_kwargs, prepare_sft_dataset, resolve_model, split_last_assistant_turn,
)
from trl_onpolicy.utils.errors import RecipeError, command_scope, has_work_started, work_started  # noqa: F401
from trl_onpolicy.utils.validation import check_output_path

# a negative number in any notation argparse does not recognise as one by itself (-1e-5, -.5e3, -1E+2)
_NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def join_negative_values(args: list[str]) -> list[str]:
    """``--flag -1e-5`` -> ``--flag=-1e-5``: argparse reads a value such as ``-1e-5`` as an option and stops with
    "expected one argument", so the range check never gets to name the field. Applied by the `trl-onpolicy`
    dispatcher (`trl_onpolicy.cli.commands`) and by `parse_recipe` below, for the launchable scripts
    (``accelerate launch scripts/train.py``) that do not come through the dispatcher."""
    out, i = [], 0
    while i < len(args):
        a = args[i]
        if a.startswith("--") and "=" not in a and i + 1 < len(args) and _NEGATIVE_NUMBER.match(args[i + 1]):
            out.append(f"{a}={args[i + 1]}")
            i += 2
        else:
            out.append(a)
            i += 1
    return out


@dataclass
class RunArguments:
    """
    Arguments of the trl-onpolicy entry points themselves (not passed to the trainer).

    Parameters:
        dry_run (`bool`, *optional*, defaults to `False`):
            Resolve the model (configuration only, no weights), the data (local data is loaded and its columns and
            sizes checked; Hub models and datasets are reported as "would load ..." and never downloaded) and the
            training configuration, print what would run, and exit without training.
        dry_run_num_processes (`int`, *optional*):
            Number of processes the dry run assumes when it reports the global batch and the number of optimizer
            steps (e.g. 8 for a recipe meant for 8 GPUs). Defaults to `WORLD_SIZE`, or 1.
    """

    dry_run: bool = field(
        default=False,
        metadata={"help": "Resolve model (config only), data and config, print the plan, and exit without training."},
    )
    dry_run_num_processes: int | None = field(
        default=None,
        metadata={"help": "Processes assumed by --dry_run for the global batch and step count (default: WORLD_SIZE or 1)."},
    )


def make_parser(config_cls, prog: str, extra: tuple = ()):
    """`TrlParser` over (ScriptArguments, config_cls, ModelConfig, DatasetMixtureConfig, RunArguments, *extra).

    Abbreviated flags are refused (``--learning_rat`` must not silently mean ``--learning_rate``). ``extra``
    dataclasses (e.g. `trl_onpolicy.trainer.online.OnlineHintedArguments`) are parsed after the others and handed to
    the entry point's ``describe``/``build_trainer`` as extra arguments.
    """
    from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, TrlParser

    return TrlParser(
        (ScriptArguments, config_cls, ModelConfig, DatasetMixtureConfig, RunArguments, *extra), prog=prog,
        allow_abbrev=False,
    )


def _known_keys(parser) -> list[str]:
    return sorted({a.dest for a in parser._actions if a.dest not in ("help", "config")})


def _unknown_key_message(where: str, keys: list[str], known: list[str]) -> str:
    parts = []
    for key in keys:
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.75)
        parts.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return (
        f"unknown key(s) in {where}: {', '.join(parts)}. Fix the spelling or remove them; "
        "`--help` lists every accepted key."
    )


def _strip_values(strings: list[str]) -> list[str]:
    """Names of the flags in a list of leftover argv strings (``["--foo", "1", "--bar=2"]`` -> ``["foo", "bar"]``)."""
    return [s[2:].split("=", 1)[0] for s in strings if s.startswith("--")] or list(strings)


def check_recipe_argv(argv: list[str]) -> Path | None:
    """The recipe named by ``--config`` in ``argv`` (None without one), checked before any parser reads it: it must
    exist, be UTF-8 YAML without Python tags (``!!python/...`` is refused: recipes are read with ``yaml.safe_load``)
    and be a mapping of key: value with an ``env:`` mapping if any. Raises `RecipeError` with one line."""
    flags = [a for a in argv if a == "--config" or a.startswith("--config=")]
    if not flags:
        return None
    if flags[0] == "--config":
        i = argv.index("--config")
        if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
            raise RecipeError("`--config` needs the path of a YAML recipe.")
        value = argv[i + 1]
    else:
        value = flags[0].split("=", 1)[1]
    if not value:
        raise RecipeError("`--config` needs the path of a YAML recipe.")
    path = Path(value)
    if not path.is_file():
        raise RecipeError(f"recipe file {str(path)!r} does not exist." if not path.exists() else
                          f"recipe {str(path)!r} is a folder; give a YAML file.")
    import yaml

    try:
        recipe = yaml.safe_load(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise RecipeError(f"recipe {str(path)!r} is not valid UTF-8 (byte {e.start}).") from None
    except yaml.YAMLError as e:
        detail = " ".join(str(e).split())
        raise RecipeError(f"recipe {str(path)!r} is not valid YAML (Python tags such as !!python are refused): {detail}") from None
    if not isinstance(recipe, dict):
        raise RecipeError(f"recipe {str(path)!r} must be a YAML mapping of key: value (it is a {type(recipe).__name__}).")
    if "env" in recipe and not isinstance(recipe["env"], dict):
        raise RecipeError(f"recipe {str(path)!r}: the `env:` block must be a mapping of VARIABLE: value.")
    return path


def parse_recipe(parser, argv: list[str] | None):
    """Parse ``argv`` (``--config recipe.yaml`` plus overrides) into the parser's dataclasses.

    Raises `RecipeError` naming each unknown key of the recipe or the command line, or a missing/unreadable recipe.
    """

    argv = join_negative_values(list(sys.argv[1:] if argv is None else argv))
    path = check_recipe_argv(argv)
    try:
        *outputs, config_rest, cli_rest = parser.parse_args_and_config(
            argv, return_remaining_strings=True, separate_remaining_strings=True
        )
    except SystemExit as e:
        if e.code in (0, None):  # --help
            raise
        # argparse already printed what was wrong (bad choice, bad type, missing value)
        raise RecipeError("invalid command line or recipe value (see the message above).") from e
    except (ValueError, TypeError) as e:  # a config's own validation (__post_init__) names the field
        raise RecipeError(str(e)) from e
    known = _known_keys(parser)
    if config_rest:
        raise RecipeError(_unknown_key_message(f"recipe {str(path)!r}", _strip_values(config_rest), known))
    if cli_rest:
        raise RecipeError(_unknown_key_message("the command line", _strip_values(cli_rest), known))
    return tuple(outputs)


def check_required(script_args, model_args, dataset_args) -> None:
    if not model_args.model_name_or_path:
        raise RecipeError(
            "missing required key 'model_name_or_path': set it in the recipe or pass --model_name_or_path "
            "(a Hub name, a local folder, or the embedded alias 'embedded:smollm2-135m-instruct')."
        )
    if not script_args.dataset_name and not dataset_args.datasets:
        raise RecipeError(
            "missing required key 'dataset_name' (or a `datasets:` list): set it in the recipe or pass "
            "--dataset_name (a Hub name, a local folder or a local .json/.jsonl/.csv/.parquet file)."
        )


# --------------------------------------------------------------------------------------------------- dry run


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def print_plan(title: str, lines: dict) -> None:
    width = max(len(k) for k in lines)
    print(f"[trl-onpolicy] dry run: {title}", flush=True)
    for key, value in lines.items():
        print(f"  {key:<{width}}  {value}", flush=True)
    print("[trl-onpolicy] dry run: nothing was trained.", flush=True)


def common_plan(model_desc, data_desc, train, evaluation, training_args, model_args, num_processes=None, train_split=None) -> dict:
    ws = num_processes or world_size()
    per_device, ga = training_args.per_device_train_batch_size, training_args.gradient_accumulation_steps
    plan = {
        "model": model_desc,
        "data": data_desc,
        "train samples": len(train) if train is not None else "(not loaded)",
        "eval samples": len(evaluation) if evaluation is not None else "-",
        "global batch": f"{per_device * ga * ws} = per_device_train_batch_size {per_device} x gradient_accumulation_steps {ga} x {ws} process(es)",
    }
    # the number of samples: loaded, or read off an explicit slice of a split that was not loaded (train[:100000])
    sliced = re.search(r"\[:(\d+)\]$", str(train_split or ""))
    n = len(train) if train is not None else int(sliced.group(1)) if sliced else None
    if training_args.max_steps > 0:
        plan["optimizer steps"] = training_args.max_steps
    elif n is not None:
        steps = math.ceil(math.ceil(n / (per_device * ga * ws)) * training_args.num_train_epochs)
        plan["optimizer steps"] = steps if train is not None else f"{steps} (from the split slice, {n} samples)"
    plan.update(
        {
            "optimizer": f"{getattr(training_args.optim, 'value', training_args.optim)} lr {training_args.learning_rate} betas ({training_args.adam_beta1}, {training_args.adam_beta2}) weight_decay {training_args.weight_decay}",
            "schedule": f"{getattr(training_args.lr_scheduler_type, 'value', training_args.lr_scheduler_type)}, warmup_steps {training_args.warmup_steps}, max_grad_norm {training_args.max_grad_norm}",
            "precision": f"bf16={training_args.bf16} fp16={training_args.fp16}" + ("" if training_args.bf16 or training_args.fp16 else " (bf16 turns on by default where an accelerator supports it)"),
            "peft": f"LoRA r={model_args.lora_r} alpha={model_args.lora_alpha} targets={model_args.lora_target_modules}" if model_args.use_peft else "no (full fine-tuning)",
            "quantisation": "4-bit" if model_args.load_in_4bit else "8-bit" if model_args.load_in_8bit else "none",
            "output_dir": training_args.output_dir,
        }
    )
    return plan


# ------------------------------------------------------------------------------------------------ finishing


def train_and_finish(trainer, training_args, dataset_name=None) -> None:
    """Train (resuming when asked), save, push when asked, and end the distributed run cleanly (`trainer.end`)."""
    acc = trainer.accelerator
    acc.print(
        f"[trl-onpolicy] {acc.num_processes} process(es), distributed type {acc.distributed_type.value}, "
        f"global batch {training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps * acc.num_processes}"
    )
    trainer.train(resume_from_checkpoint=resume_arg(training_args.resume_from_checkpoint, training_args.output_dir))
    trainer.accelerator.print("[trl-onpolicy] training completed.")
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"[trl-onpolicy] model saved to {training_args.output_dir}.")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=dataset_name)
    # only the main process writes in save_model/push_to_hub: wait for it, so that no rank tears down its process
    # group while another still works (a rank that exits early can abort with "terminate called without an active
    # exception" under gloo); then finish the trackers and destroy the group, as TRL's own scripts do
    trainer.accelerator.wait_for_everyone()
    if hasattr(trainer, "end"):
        trainer.end()


def report_dropped_rows(trainer, train) -> None:
    """TRL drops rows left with no trainable token once truncated to ``max_length`` (a prompt that fills it): count
    them, and refuse a run that would train on nothing."""
    prepared = getattr(trainer, "train_dataset", None)
    if prepared is None or not hasattr(prepared, "__len__") or train is None or getattr(trainer.args, "packing", False):
        return
    dropped = len(train) - len(prepared)
    if len(prepared) == 0:
        raise RecipeError(
            f"every one of the {len(train)} training rows is longer than max_length={trainer.args.max_length} before "
            "its completion starts: raise max_length or shorten the prompts."
        )
    if dropped > 0:
        trainer.accelerator.print(
            f"[trl-onpolicy] {dropped} of {len(train)} training rows have a prompt of max_length="
            f"{trainer.args.max_length} tokens or more (no completion token left): they are not trained on."
        )


def run_main(body, prog: str):
    """Run ``body()`` as one command (`command_scope`): a `RecipeError` raised before ``body`` calls
    `work_started()` is printed as ``prog: error: ...`` and turned into exit status 2; after it, it is re-raised (a
    failure of the run: `trl_onpolicy.cli.commands` shows the traceback and exits 1, as Python does for scripts/*.py)."""
    with command_scope():
        try:
            return body()
        except RecipeError as e:
            if has_work_started():
                raise
            print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
            return 2
        except KeyboardInterrupt:
            # also when launched as scripts/*.py (without trl_onpolicy.cli.commands): the finished checkpoints are kept
            print(f"\n{prog}: interrupted. Finished checkpoints are kept: run the same command with "
                  "resume_from_checkpoint: true to continue.", file=sys.stderr, flush=True)
            return 130


def prepare_recipe(parser, argv, columns, prepare=None, check=None):
    """Everything `run_recipe` does before building the trainer: parse the recipe, resolve the model, load the data,
    check its columns and apply the entry point's data preparation (``prepare(dataset, training_args)``, e.g.
    `prepare_sft_dataset`) after ``check(training_args, train, evaluation, *extra)``, if given (it validates the
    combination before any model is loaded). Returns a dict with ``script_args``, ``training_args``, ``model_args``,
    ``dataset_args``, ``run_args``, ``extra`` (the parser's extra dataclasses, `make_parser`), ``model_path``,
    ``model_desc``, ``train``, ``evaluation`` and ``data_desc``. Tests call it to
    check what a recipe trains on, exactly as the command prepares it."""
    script_args, training_args, model_args, dataset_args, run_args, *extra = parse_recipe(parser, argv)
    check_required(script_args, model_args, dataset_args)
    model_path, model_desc = resolve_model(model_args.model_name_or_path, dry_run=run_args.dry_run)
    # the output must not overwrite what the run reads (the model folder, a local dataset) and must be writable
    inputs = [model_path, script_args.dataset_name] + [d.path for d in (dataset_args.datasets or [])]
    try:
        check_output_path(training_args.output_dir, "output_dir", inputs=[i for i in inputs if i and is_local(str(i))])
    except ValueError as e:
        raise RecipeError(str(e)) from e
    if training_args.resume_from_checkpoint not in (None, True) and str(training_args.resume_from_checkpoint).lower() \
            not in ("", "false", "no", "none", "true", "last", "yes"):
        resume_arg(training_args.resume_from_checkpoint)  # an explicit checkpoint that is missing or incomplete
    need_eval = training_args.eval_strategy != "no"
    train, evaluation, data_desc = load_splits(script_args, dataset_args, need_eval, run_args.dry_run)
    for dataset, what in ((train, "training"), (evaluation, "evaluation")):
        if dataset is not None:
            check_columns(dataset, columns, what)
    if check is not None:
        check(training_args, train, evaluation, *extra)
    if prepare is not None:
        train, evaluation = prepare(train, training_args), prepare(evaluation, training_args)
    return dict(script_args=script_args, training_args=training_args, model_args=model_args, dataset_args=dataset_args,
                run_args=run_args, extra=extra, model_path=model_path, model_desc=model_desc, train=train, evaluation=evaluation,
                data_desc=data_desc)


def run_recipe(prog: str, parser, argv, columns, describe, build_trainer, prepare=None, check=None) -> int:
    """The body every training entry point shares: `prepare_recipe` (parse, resolve the model and the data, check the
    columns, prepare the data), then either print the dry-run plan or build the trainer, train, save and end the run.

    ``describe(training_args, model_args, *extra) -> dict`` gives the trainer-specific plan lines (at least
    ``trainer`` and ``loss``); ``build_trainer(model_path, training_args, model_args, script_args, train, evaluation,
    *extra)`` the trainer; ``extra`` are the parser's extra dataclasses (`make_parser`); ``check(training_args,
    train, evaluation, *extra)``, if given, validates the combination before the dry-run plan or any training.
    """

    def body():
        r = prepare_recipe(parser, argv, columns, prepare, check)
        training_args, model_args, run_args, extra = r["training_args"], r["model_args"], r["run_args"], r["extra"]
        model_path, model_desc, train, evaluation = r["model_path"], r["model_desc"], r["train"], r["evaluation"]
        plan = describe(training_args, model_args, *extra)
        if run_args.dry_run:
            if model_path is not None:
                model_desc += ": " + describe_model_config(model_path, model_args)
            plan.update(
                common_plan(model_desc, r["data_desc"], train, evaluation, training_args, model_args,
                            run_args.dry_run_num_processes, r["script_args"].dataset_train_split)
            )
            print_plan(prog, plan)
            return 0
        trainer = build_trainer(model_path, training_args, model_args, r["script_args"], train, evaluation, *extra)
        report_dropped_rows(trainer, train)
        work_started()  # the input is checked: an error from here on is a failed run, not bad input
        trainer.accelerator.print(f"[trl-onpolicy] {plan['trainer']}: {model_desc}; data: {r['data_desc']}; loss: {plan['loss']}")
        train_and_finish(trainer, training_args, r["script_args"].dataset_name)
        return 0

    return run_main(body, prog)
