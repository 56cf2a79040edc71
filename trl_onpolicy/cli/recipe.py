"""Shared plumbing of the training entry points (`trl-onpolicy train|dpo|simpo`, `scripts/*.py`).

Each entry point parses a recipe with TRL's `TrlParser` (``--config recipe.yaml``, command-line flags override the
YAML, a top-level ``env:`` block is exported) into TRL's `ScriptArguments`, the trainer's config class, TRL's
`ModelConfig`, TRL's `DatasetMixtureConfig` and this module's `RunArguments`. This module adds what `TrlParser` leaves
out: unknown or misspelled keys stop with an error naming them (with the closest valid key), missing required keys
stop with an error, datasets may be a Hub name, a local folder or a local file, and ``--dry_run`` resolves model,
data and config without downloading or training.
"""

from __future__ import annotations

import difflib
import importlib
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from trl_onpolicy.utils.validation import check_hub_model, check_model_source, check_nonempty_column, check_output_path

# column sets a trainer accepts, by kind of trainer (any one set must be present)
SFT_COLUMNS = (("messages",), ("prompt", "completion"), ("text",), ("input_ids",))
PREFERENCE_COLUMNS = (("prompt", "chosen", "rejected"), ("chosen", "rejected"))


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


class RecipeError(ValueError):
    """A recipe or command line that cannot run: the message says which key is wrong and how to fix it."""


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


# ----------------------------------------------------------------------------------------------------- models


def is_local(name: str) -> bool:
    return Path(name).expanduser().exists()


def resolve_model(name: str, dry_run: bool = False) -> tuple[str | None, str]:
    """``(path to load, description)``. Embedded aliases (``embedded:...``) become their cached local folder; in a
    dry run an embedded model that is not converted yet is only reported (conversion takes ~30 s)."""
    if isinstance(name, str) and name.lower().startswith("embedded:"):
        models = importlib.import_module("trl_onpolicy.utils.models")
        key = name.lower()
        if key not in models.EMBEDDED_MODELS:
            raise RecipeError(f"model_name_or_path={name!r}: unknown embedded model; available: {sorted(models.EMBEDDED_MODELS)}.")
        if dry_run:
            cached = models.cache_root() / "SmolLM2-135M-Instruct"
            if (cached / "config.json").is_file():
                return str(cached), f"embedded model {name} (cached at {cached})"
            try:
                gguf = models.smollm2_gguf_file()
            except (ImportError, FileNotFoundError) as e:  # the offline model package is missing
                raise RecipeError(f"model_name_or_path={name!r}: {e}") from e
            return None, f"would convert the embedded GGUF {gguf} once (~30 s) and load it ({name})"
        try:
            path = models.resolve_model_path(name)
        except (ImportError, FileNotFoundError) as e:
            raise RecipeError(f"model_name_or_path={name!r}: {e}") from e
        return path, f"embedded model {name} ({path})"
    try:
        check_model_source(name)
    except (ValueError, FileNotFoundError) as e:
        raise RecipeError(str(e)) from e
    if is_local(name):
        return str(Path(name).expanduser()), f"local folder {name}"
    if dry_run:
        return None, f"would load {name!r} from the Hugging Face Hub (not downloaded in a dry run)"
    try:
        check_hub_model(name)  # an unreachable id: one line now, not a traceback from the trainer
    except FileNotFoundError as e:
        raise RecipeError(str(e)) from e
    return name, f"Hub model {name!r}"


def describe_model_config(path: str, model_args) -> str:
    """Architecture and parameter count of a local model folder, read from its config (no weights are loaded)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    n = sum(p.numel() for p in model.parameters())
    text = config.get_text_config()
    return (
        f"{config.model_type} ({type(model).__name__}), {n / 1e6:.2f}M parameters, vocab {text.vocab_size}, "
        f"dtype {model_args.dtype}, attn_implementation {model_args.attn_implementation or 'default'}"
    )


def model_init_kwargs(model_args, training_args, with_quantization: bool = False) -> dict:
    """What TRL's own scripts pass to ``from_pretrained`` (revision, dtype, attention implementation); with
    ``with_quantization`` also the bitsandbytes config (for trainers that take no ``quantization_config`` argument)."""
    kwargs = dict(
        revision=model_args.model_revision,
        trust_remote_code=getattr(training_args, "trust_remote_code", False),
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )
    if with_quantization:
        from trl import get_quantization_config

        quantization_config = get_quantization_config(model_args)
        if quantization_config is not None:
            kwargs["quantization_config"] = quantization_config
    if training_args.model_init_kwargs is not None:
        kwargs.update(training_args.model_init_kwargs)
    return kwargs


# ------------------------------------------------------------------------------------------------------ data


def _split_name(spec: str) -> str:
    return re.split(r"[\[+]", spec, maxsplit=1)[0].strip()


def _slice(dataset, spec: str):
    """Apply the datasets slicing syntax of a split spec (``train[:100000]``, ``train[10%:]``) to one loaded split."""
    from datasets import ReadInstruction, concatenate_datasets

    name = _split_name(spec)
    if spec.strip() == name:
        return dataset
    try:
        instructions = ReadInstruction.from_spec(spec).to_absolute({name: len(dataset)})
    except (ValueError, AssertionError) as e:
        raise RecipeError(f"split {spec!r}: {e}. Write e.g. 'train', 'train[:1000]' or 'train[:10%]'.") from e
    parts = [dataset.select(range(i.from_, i.to)) for i in instructions]
    return parts[0] if len(parts) == 1 else concatenate_datasets(parts)


def is_offline_source(name: str) -> bool:
    """A dataset that loads without the Hub: a local file or folder, or an offline generator (``reasoning-gym:...``)."""
    return is_local(name) or str(name).startswith("reasoning-gym:")


def generator_kwargs(config: str | None) -> dict:
    """``dataset_config`` of a ``reasoning-gym:`` source: ``"key=value,key=value"`` arguments of
    `trl_onpolicy.data.datasets.math_word_problems` (e.g. ``"seed=0,max_solution_chars=200"``); values are parsed as YAML."""
    import yaml

    kwargs = {}
    for item in filter(None, (p.strip() for p in (config or "").split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise RecipeError(
                f"dataset_config={config!r}: for a reasoning-gym source write 'key=value,key=value' "
                "(arguments of trl_onpolicy.data.datasets.math_word_problems, e.g. 'seed=0,max_solution_chars=200')."
            )
        kwargs[key.strip()] = yaml.safe_load(value.strip())
    return kwargs


def looks_local(name: str) -> bool:
    """A dataset name written as a path (``./runs/x``, ``/data/x``, ``~/x``, ``x.jsonl``): never a Hub name."""
    text = str(name)
    return text.startswith((".", "/", "~")) or Path(text).suffix.lower() in (".json", ".jsonl", ".csv", ".parquet", ".arrow")


def load_split(name: str, spec: str, config: str | None = None):
    """One split of a dataset (Hub name, local folder or file, or ``reasoning-gym:TASK[:N]``) loaded with
    `trl_onpolicy.data.datasets.load_sft_dataset`; ``spec`` may slice (``train[:100000]``)."""
    from trl_onpolicy.data.datasets import load_sft_dataset

    kwargs = {"name": config} if config else {}
    try:
        if str(name).startswith("reasoning-gym:"):
            return _slice(load_sft_dataset(name, split=_split_name(spec), **generator_kwargs(config)), spec)
        if is_offline_source(name):
            # a saved folder or a single file takes no config name; a folder of data files may
            folder_of_files = is_local(name) and Path(name).expanduser().is_dir()
            return _slice(load_sft_dataset(name, split=_split_name(spec), **(kwargs if folder_of_files else {})), spec)
        return load_sft_dataset(name, split=spec, **kwargs)
    except (ValueError, FileNotFoundError) as e:
        raise RecipeError(f"dataset_name={name!r}, split {spec!r}: {e}") from e


def load_splits(script_args, dataset_args, need_eval: bool, dry_run: bool):
    """``(train, eval or None, description)``. In a dry run a Hub dataset is not loaded: ``train`` is None and the
    description says what would be loaded."""
    if dataset_args.datasets:
        if script_args.dataset_name:
            print("[trl-onpolicy] both `datasets` and `dataset_name` are set: using `datasets`.", flush=True)
        paths = [d.path for d in dataset_args.datasets]
        if dry_run and any(not is_local(d.path) and not d.data_files for d in dataset_args.datasets):
            return None, None, f"would load the mixture {paths} from the Hugging Face Hub (not downloaded in a dry run)"
        from trl import get_dataset

        data = get_dataset(dataset_args)
        train = data["train"]
        evaluation = data["test"] if need_eval and "test" in data else None
        if need_eval and evaluation is None:
            raise RecipeError("eval_strategy is set but the `datasets:` mixture has no test split: set test_split_size.")
        return train, evaluation, f"mixture of {paths}"

    name, config = script_args.dataset_name, script_args.dataset_config
    train_spec, test_spec = script_args.dataset_train_split, script_args.dataset_test_split
    if is_local(name):
        where = f"local {'folder' if Path(name).expanduser().is_dir() else 'file'} {name}"
    elif is_offline_source(name):
        where = f"offline generator {name}"
    else:
        where = f"Hub dataset {name!r}" + (f" (config {config})" if config else "")
    carve = bool(dataset_args.test_split_size)
    if dry_run and looks_local(name) and not is_local(name):
        return None, None, (
            f"would read the local dataset {name} (split {train_spec}), which does not exist yet: produce it first "
            "(see the recipe's header)"
        )
    if dry_run and not is_offline_source(name):
        splits = train_spec + (f" and {test_spec}" if need_eval and not carve else "")
        return None, None, f"would load split(s) {splits} of {where} (not downloaded in a dry run)"
    train = load_split(name, train_spec, config)
    evaluation = None
    if need_eval:
        if carve:
            parts = train.train_test_split(test_size=dataset_args.test_split_size, seed=0)
            train, evaluation = parts["train"], parts["test"]
        else:
            try:
                evaluation = load_split(name, test_spec, config)
            except RecipeError as e:
                raise RecipeError(
                    f"eval_strategy is set but the evaluation split could not be loaded ({e}). Set dataset_test_split "
                    "to an existing split, set test_split_size to carve one out of the training split, or set "
                    "eval_strategy: 'no'."
                ) from e
    desc = f"{where}, split {train_spec}"
    if need_eval:
        desc += f", eval {f'{dataset_args.test_split_size} of train' if carve else test_spec}"
    return train, evaluation, desc


def check_columns(dataset, kinds, what: str) -> None:
    cols = set(dataset.column_names)
    if not any(set(k) <= cols for k in kinds):
        wanted = " or ".join("+".join(k) for k in kinds)
        raise RecipeError(f"{what} dataset has columns {sorted(cols)}; it needs {wanted}.")
    if len(dataset) == 0:
        raise RecipeError(f"{what} dataset is empty: check dataset_train_split / dataset_test_split.")
    # rows with nothing to learn from are refused, not trained on (an empty completion teaches an immediate end of
    # turn); the message counts them and names the first rows
    for column in ("completion", "messages", "text", "chosen", "rejected"):
        if column in cols and (column != "text" or not any(set(k) <= cols for k in kinds if k != ("text",))):
            try:
                check_nonempty_column(dataset, column, f"{what} dataset")
            except ValueError as e:
                raise RecipeError(str(e)) from e


def split_last_assistant_turn(example: dict) -> dict:
    """``messages`` -> ``prompt`` (every turn before the last assistant turn: system, user, earlier turns) and
    ``completion`` (that last assistant turn). Turns after it are dropped (nothing would train on them)."""
    messages = example["messages"]
    last = max((i for i, m in enumerate(messages or []) if m.get("role") == "assistant"), default=None)
    if last is None:
        raise RecipeError(
            "a conversational training row has no assistant turn: completion-only training needs one per row "
            f"(roles found: {[m.get('role') for m in messages or []]})."
        )
    return {"prompt": list(messages[:last]), "completion": [messages[last]]}


def prepare_sft_dataset(dataset, training_args):
    """The data preparation of `trl-onpolicy train` (and scripts/train.py): completion-only training.

    A conversational ``messages`` dataset is mapped to prompt/completion (`split_last_assistant_turn`), which TRL's
    SFTTrainer then trains with ``completion_only_loss`` (its default for prompt/completion data): system and user
    tokens get label -100 whatever the chat template. This works for templates without ``{% generation %}`` markers
    (Qwen2.5-Math's, SmolLM2's), which TRL's ``assistant_only_loss`` cannot mask. Left as is: datasets already in
    prompt/completion (or text / pre-tokenized) form, and recipes that set ``assistant_only_loss: true`` or
    ``completion_only_loss: false`` (training on the whole conversation, on purpose)."""
    if dataset is None:
        return None
    columns = set(dataset.column_names)
    if "messages" not in columns or {"prompt", "completion"} <= columns:
        return dataset
    if getattr(training_args, "assistant_only_loss", False) or getattr(training_args, "completion_only_loss", None) is False:
        return dataset
    return dataset.map(split_last_assistant_turn, remove_columns=["messages"],
                       desc="messages -> prompt/completion (completion-only loss)")


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


CHECKPOINT_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                      "pytorch_model.bin.index.json", "adapter_model.safetensors", "adapter_model.bin")


def checkpoint_is_complete(folder) -> bool:
    """Whether a ``checkpoint-N`` folder was written to the end: `Trainer` writes ``trainer_state.json`` last (after
    the weights, optimizer and RNG states), so a folder with a readable one and weights is complete. A DeepSpeed
    checkpoint (``global_step*``) counts as weights."""
    import json

    folder = Path(folder)
    state = folder / "trainer_state.json"
    try:
        json.loads(state.read_text())
    except (OSError, ValueError):
        return False
    return any((folder / name).is_file() for name in CHECKPOINT_WEIGHTS) or any(folder.glob("global_step*"))


def last_complete_checkpoint(output_dir) -> str | None:
    """The newest complete ``checkpoint-N`` of ``output_dir`` (None if there is none); incomplete newer ones (a run
    killed while saving) are skipped with a printed note."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    pattern = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
    found = sorted((int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := pattern.match(p.name)))
    for step, path in reversed(found):
        if checkpoint_is_complete(path):
            return str(path)
        print(f"[trl-onpolicy] {path} is incomplete (no readable trainer_state.json or no weights; a run stopped while "
              "saving it): skipping it.", flush=True)
    return None


def resume_arg(value, output_dir=None):
    """``resume_from_checkpoint``: "true"/"last" resume from the newest complete checkpoint of output_dir (none: start
    fresh, with a note), a path resumes from it (it must be complete), empty/"false" starts fresh."""
    if value is None or str(value).lower() in ("", "false", "no", "none"):
        return None
    if value is True or str(value).lower() in ("true", "last", "yes"):
        if output_dir is None:
            return True
        last = last_complete_checkpoint(output_dir)
        if last is None:
            print(f"[trl-onpolicy] resume_from_checkpoint is set but {output_dir} holds no complete checkpoint: "
                  "starting from the beginning.", flush=True)
        return last
    if not Path(value).is_dir():
        raise RecipeError(f"resume_from_checkpoint={value!r}: no such checkpoint folder.")
    if not checkpoint_is_complete(value):
        raise RecipeError(
            f"resume_from_checkpoint={value!r} is incomplete (no readable trainer_state.json or no weights; the run "
            "stopped while saving it): pass an earlier checkpoint, or resume_from_checkpoint: true for the newest "
            "complete one."
        )
    return value


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
    """Run ``body()``; a `RecipeError` is printed as ``prog: error: ...`` and turned into exit status 2."""
    try:
        return body()
    except RecipeError as e:
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
        trainer.accelerator.print(f"[trl-onpolicy] {plan['trainer']}: {model_desc}; data: {r['data_desc']}; loss: {plan['loss']}")
        train_and_finish(trainer, training_args, r["script_args"].dataset_name)
        return 0

    return run_main(body, prog)
