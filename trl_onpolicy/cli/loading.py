"""What a training recipe names, resolved and loaded: the model (`resolve_model`: an embedded alias, a local folder or
a Hub name, checked before any download) and the data (`load_splits`: a Hub dataset, a local folder or file, an
offline ``reasoning-gym:`` generator or TRL's ``datasets:`` mixture, with datasets' split slicing), its columns checked
(`check_columns`) and prepared for completion-only training (`prepare_sft_dataset`). Used by `trl_onpolicy.cli.recipe`
(which re-exports its public names); every refusal is a one-line `RecipeError`.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

from trl_onpolicy.utils.errors import RecipeError
from trl_onpolicy.utils.validation import check_hub_model, check_model_source, check_nonempty_column

# column sets a trainer accepts, by kind of trainer (any one set must be present)
SFT_COLUMNS = (("messages",), ("prompt", "completion"), ("text",), ("input_ids",))
PREFERENCE_COLUMNS = (("prompt", "chosen", "rejected"), ("chosen", "rejected"))


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
    from trl_onpolicy.data.prompts import last_assistant_index

    last = last_assistant_index(messages)
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
