"""Input checks at the boundary: one mechanism for every config, CLI argument class and path.

Every check raises ``ValueError`` (or ``FileNotFoundError`` for a missing input) with a one-line message naming the
field or file, the value and what is accepted; `trl_onpolicy.cli.commands` turns those into ``trl-onpolicy CMD: error: ...``
with exit status 2. Checks run before any work starts (before a model is loaded or a file is written).

Numeric fields are described by `Range` and checked with `check_fields`::

    check_fields(self, {"temperature": Range(lo=0), "top_p": Range(lo=0, hi=1, lo_open=True)}, owner="EvalConfig")

NaN and infinities are always refused (unless ``Range(allow_inf=True)``); ``None`` only with ``optional=True``.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

# the file suffixes of model weights (a folder with none of them is not a model)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".npz")


@dataclass(frozen=True)
class Range:
    """Accepted values of one numeric field.

    Args:
        lo, hi: bounds (``None`` = unbounded on that side).
        lo_open, hi_open: exclude the bound itself.
        integer: the value must be a whole number (bool is refused).
        optional: ``None`` is accepted (meaning "unset").
        allow_inf: accept ``+inf``/``-inf`` (NaN never).
        also: extra accepted sentinel values outside the range (e.g. ``-1`` for "unset" max_steps).
    """

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    integer: bool = False
    optional: bool = False
    allow_inf: bool = False
    also: tuple = ()

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a finite number"
        if self.lo is not None and self.hi is not None:
            span = f" in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"
        elif self.lo is not None:
            span = f" {'>' if self.lo_open else '>='} {self.lo:g}"
        elif self.hi is not None:
            span = f" {'<' if self.hi_open else '<='} {self.hi:g}"
        else:
            span = ""
        extra = "".join(f" or {v!r}" for v in self.also) + (" or None" if self.optional else "")
        return f"{kind}{span}{extra}"

    def accepts(self, value) -> bool:
        if value is None:
            return self.optional
        if any(value == v and type(value) is type(v) for v in self.also):
            return True
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if math.isnan(value):
            return False
        if math.isinf(value) and not self.allow_inf:
            return False
        if self.integer and (isinstance(value, float) and not value.is_integer()):
            return False
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        if self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi):
            return False
        return True


# ranges used across configs
POSITIVE = Range(lo=0, lo_open=True)
NON_NEGATIVE = Range(lo=0)
FRACTION = Range(lo=0, hi=1)
PROBABILITY_OPEN_LOW = Range(lo=0, hi=1, lo_open=True)  # top_p
COUNT = Range(lo=1, integer=True)  # sizes and lengths that must be at least 1
OPTIONAL_COUNT = Range(lo=1, integer=True, optional=True)
ANY_FINITE = Range()


def invalid(owner: str | None, name: str, value, accepted: str) -> ValueError:
    """The one error message format: ``Owner.name=value is invalid: <accepted>.``"""
    where = f"{owner}.{name}" if owner else name
    return ValueError(f"{where}={value!r} is invalid: {accepted.rstrip('.')}.")


def check_value(name: str, value, rule: Range, owner: str | None = None) -> None:
    if not rule.accepts(value):
        raise invalid(owner, name, value, f"expected {rule.describe()}")


def check_fields(obj, rules: Mapping[str, Range], owner: str | None = None) -> None:
    """Check ``getattr(obj, name)`` (or ``obj[name]`` for a mapping) against each rule; fields absent from ``obj`` are
    skipped, so one table can serve several classes."""
    owner = owner if owner is not None else type(obj).__name__
    for name, rule in rules.items():
        if isinstance(obj, Mapping):
            if name not in obj:
                continue
            value = obj[name]
        elif hasattr(obj, name):
            value = getattr(obj, name)
        else:
            continue
        check_value(name, value, rule, owner)


def check_choice(name: str, value, choices: Iterable, owner: str | None = None) -> None:
    choices = list(choices)
    if value not in choices:
        raise invalid(owner, name, value, f"choose one of {choices}")


# ------------------------------------------------------------------------------------------------------------- paths
def _resolved(path) -> Path:
    return Path(os.path.expanduser(str(path))).resolve()


def looks_like_local_path(name: str) -> bool:
    """True for names that can only be a local path (``./x``, ``/x``, ``~/x``, ``x/y/z``, or an existing path); a
    Hub id is ``owner/name`` with no other slashes."""
    if not isinstance(name, str) or not name:
        return False
    if name.lower().startswith("embedded:"):
        return False
    if Path(os.path.expanduser(name)).exists():
        return True
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def check_input_path(path, what: str, *, must_be_dir: bool | None = None) -> Path:
    """A local input that must exist: raises FileNotFoundError naming ``what`` and the path."""
    p = _resolved(path)
    if not p.exists():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist (resolved to {p}).")
    if must_be_dir is True and not p.is_dir():
        raise ValueError(f"{what} {str(path)!r} is a file; expected a folder.")
    if must_be_dir is False and p.is_dir():
        raise ValueError(f"{what} {str(path)!r} is a folder; expected a file.")
    return p


def check_output_path(path, what: str, *, inputs: Iterable = (), is_dir: bool = True) -> Path:
    """An output location, checked before any work starts.

    Refuses: an output that is an existing file where a folder is expected (or the reverse); an output equal to one
    of ``inputs`` (a dataset file, a model folder: anything the job reads) or inside an input folder; a location that
    cannot be written (probed by creating and removing a temporary file). Leaves nothing behind.
    """
    if path is None or str(path) == "":
        raise ValueError(f"{what} is empty: give a path to write to.")
    p = _resolved(path)
    if is_dir and p.exists() and not p.is_dir():
        raise ValueError(f"{what} {str(path)!r} is an existing file; give a folder path.")
    if not is_dir and p.is_dir():
        raise ValueError(f"{what} {str(path)!r} is an existing folder; give a file path.")
    for src in inputs:
        if src is None or str(src) == "":
            continue
        s = _resolved(src)
        if s.exists() and (p == s or (s.is_dir() and p.is_relative_to(s))):
            raise ValueError(f"{what} {str(path)!r} would overwrite the input {str(src)!r}; write the output somewhere else.")
    # the deepest existing ancestor must be a folder we can write in
    probe = p if (is_dir and p.exists()) else next((a for a in p.parents if a.exists()), None)
    if probe is None:
        return p
    if not probe.is_dir():
        raise ValueError(f"{what} {str(path)!r} cannot be created: {probe} is a file.")
    try:
        fd, tmp = tempfile.mkstemp(dir=probe, prefix=".write-probe-")
        os.close(fd)
        os.unlink(tmp)
    except OSError as err:
        raise ValueError(f"{what} {str(path)!r} is not writable ({probe}: {err.strerror}).") from None
    return p


# ------------------------------------------------------------------------------------- TRL / transformers fields
# One table for every TrainingArguments-derived config our commands build (IDFTConfig, DPOConfig, CPOConfig/
# SimPOConfig): the fields TRL and transformers pass on unchecked (NaN and inf train a model of NaN weights with exit
# status 0), and this package's own numeric fields. A field a config does not have is skipped.
TRAINING_ARGUMENT_RULES: dict[str, Range] = {
    # optimiser and schedule (transformers.TrainingArguments)
    "learning_rate": NON_NEGATIVE,
    "weight_decay": NON_NEGATIVE,
    "max_grad_norm": Range(lo=0, optional=True),
    "adam_beta1": Range(lo=0, hi=1, hi_open=True),
    "adam_beta2": Range(lo=0, hi=1, hi_open=True),
    "adam_epsilon": NON_NEGATIVE,
    "warmup_ratio": Range(lo=0, hi=1, optional=True),
    "warmup_steps": Range(lo=0),
    "num_train_epochs": NON_NEGATIVE,
    "max_steps": Range(integer=True),  # <= 0 means "use num_train_epochs"; see check_training_arguments
    "per_device_train_batch_size": COUNT,
    "per_device_eval_batch_size": COUNT,
    "gradient_accumulation_steps": COUNT,
    "eval_accumulation_steps": OPTIONAL_COUNT,
    "logging_steps": POSITIVE,
    "save_steps": POSITIVE,
    "eval_steps": Range(lo=0, lo_open=True, optional=True),
    "save_total_limit": Range(lo=1, integer=True, optional=True),
    "seed": Range(integer=True),
    "data_seed": Range(integer=True, optional=True),
    "label_smoothing_factor": FRACTION,
    "dataloader_num_workers": Range(lo=0, integer=True),
    "dataloader_prefetch_factor": OPTIONAL_COUNT,
    "dataset_num_proc": OPTIONAL_COUNT,
    "eval_delay": NON_NEGATIVE,
    "neftune_noise_alpha": Range(lo=0, lo_open=True, optional=True),
    "torch_empty_cache_steps": OPTIONAL_COUNT,
    "ddp_timeout": COUNT,
    "router_aux_loss_coef": Range(lo=0, optional=True),
    # lengths (SFTConfig, DPOConfig, CPOConfig)
    "max_length": OPTIONAL_COUNT,
    "max_prompt_length": OPTIONAL_COUNT,
    "max_completion_length": OPTIONAL_COUNT,
    # preference losses (DPOConfig, CPOConfig / SimPOConfig): beta <= 0 inverts or zeroes the preference
    "beta": POSITIVE,
    "label_smoothing": Range(lo=0, hi=0.5),
    "simpo_gamma": NON_NEGATIVE,
    "cpo_alpha": NON_NEGATIVE,
    "rpo_alpha": Range(lo=0, optional=True),
    "ld_alpha": Range(lo=0, hi=1, optional=True),
    "ref_model_mixup_alpha": FRACTION,
    "ref_model_sync_steps": COUNT,
    "precompute_ref_batch_size": OPTIONAL_COUNT,
    "f_alpha_divergence_coef": ANY_FINITE,
    "discopop_tau": POSITIVE,
    "alpha": ANY_FINITE,  # CPOConfig's AlphaPO exponent
    # the token-loss family (IDFTConfig)
    "idft_beta": POSITIVE,
    "idft_gamma_min": NON_NEGATIVE,
    "idft_gamma_max": NON_NEGATIVE,
    "idft_warmup_ratio": FRACTION,
    "idft_transition_ratio": FRACTION,
    "eaft_top_k": Range(lo=2, integer=True),
}


def check_training_arguments(args, owner: str | None = None) -> None:
    """Check a TrainingArguments-derived config against `TRAINING_ARGUMENT_RULES` and the cross-field rules: a run
    needs ``max_steps > 0`` or ``num_train_epochs > 0`` (both unset saves the untrained model as if trained). Call it
    first thing in the config's ``__post_init__``."""
    owner = owner or type(args).__name__
    check_fields(args, TRAINING_ARGUMENT_RULES, owner)
    if getattr(args, "max_steps", 1) <= 0 and getattr(args, "num_train_epochs", 1) <= 0:
        raise invalid(owner, "num_train_epochs", args.num_train_epochs,
                      f"with max_steps={args.max_steps} nothing would be trained; set max_steps > 0 or num_train_epochs > 0")


# -------------------------------------------------------------------------------------------------------- models
def check_model_source(name, what: str = "model_name_or_path") -> None:
    """A model given as a local path must be a folder holding a config and weight files; a missing local path is
    reported as a missing path (not as a failed Hub download). Hub ids and embedded aliases pass unchanged."""
    if not isinstance(name, (str, os.PathLike)) or not str(name):
        raise ValueError(f"{what} is empty: give a local folder, a Hub id or embedded:smollm2-135m-instruct.")
    name = str(name)
    if not looks_like_local_path(name):
        return
    p = _resolved(name)
    if not p.exists():
        raise FileNotFoundError(f"{what}={name!r}: no such local folder (resolved to {p}).")
    if not p.is_dir():
        raise ValueError(f"{what}={name!r} is a file; give the model folder (with config.json and the weights).")

    if not (p / "config.json").is_file() and not (p / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{what}={name!r}: the folder has no config.json, so it is not a saved model.")
    if not any(f.suffix in WEIGHT_SUFFIXES for f in p.iterdir() if f.is_file()):
        raise FileNotFoundError(f"{what}={name!r}: the folder has no weight files (*.safetensors or *.bin).")


def check_hub_model(name, what: str = "model_name_or_path", revision: str | None = None) -> None:
    """A model named by a Hub id (not a local folder, not an embedded alias) must be reachable: its config is
    fetched now (from the local Hub cache when offline), so a misspelt id, a missing local folder written as
    ``owner/name``, or no network is one line naming the field, not a traceback after the run has started."""
    if not isinstance(name, str) or not name or looks_like_local_path(name) or name.lower().startswith("embedded:"):
        return
    from huggingface_hub import hf_hub_download

    first = None
    for file in ("config.json", "adapter_config.json"):  # a model, or a PEFT adapter; nothing is parsed (no remote code)
        try:
            hf_hub_download(name, file, revision=revision)
            return
        except (OSError, ValueError) as err:  # huggingface_hub's errors: not found, gated, offline cache miss, bad id
            first = first or err
    if first is not None:
        reason = next((line.strip() for line in str(first).splitlines() if line.strip()), type(first).__name__)
        raise FileNotFoundError(
            f"{what}={name!r} is not a local folder and could not be loaded from the Hugging Face Hub ({reason}); "
            f"check the id, or give the path of a local model folder (./{name} if that is what you meant)."
        ) from None


# ---------------------------------------------------------------------------------------------------------- data
TEXT_DATA_SUFFIXES = (".json", ".jsonl", ".csv")


def check_text_file(path, what: str = "dataset") -> None:
    """A local text data file (.json/.jsonl/.csv) must be UTF-8 and hold at least one non-blank line; the error
    names the file and the first bad line."""
    p = Path(path)
    if p.suffix.lower() not in TEXT_DATA_SUFFIXES or not p.is_file():
        return
    seen = False
    with open(p, "rb") as f:
        for number, line in enumerate(f, start=1):
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(
                    f"{what} file {str(path)!r}, line {number}: not valid UTF-8 ({err.reason} at byte {err.start} of "
                    "the line); re-encode the file as UTF-8."
                ) from None
            seen = seen or bool(text.strip())
    if not seen:
        raise ValueError(f"{what} file {str(path)!r} is empty: it holds no rows.")


def _is_empty_text(value) -> bool:
    """A completion that holds no text: None, "", whitespace, [] or chat messages whose assistant turns are all empty."""
    if value is None:
        return True
    if isinstance(value, str):
        return not value.strip()
    if isinstance(value, (list, tuple)):
        if not value:
            return True
        if all(isinstance(m, Mapping) for m in value):
            turns = [m for m in value if m.get("role", "assistant") == "assistant"]
            return not turns or all(_is_empty_text(m.get("content")) for m in turns)
        return False
    return False


def check_nonempty_column(rows, column: str, what: str = "dataset") -> None:
    """Refuse rows whose ``column`` (a completion, chosen or rejected response) is null or empty: training on them
    teaches an immediate end of turn. The message gives the count and the first row numbers (0-based)."""
    values = rows[column] if hasattr(rows, "column_names") else [r.get(column) for r in rows]
    bad = [i for i, v in enumerate(values) if _is_empty_text(v)]
    if bad:
        shown = ", ".join(map(str, bad[:5])) + (", ..." if len(bad) > 5 else "")
        raise ValueError(
            f"{what}: {len(bad)} of {len(values)} rows have an empty or null `{column}` (rows {shown}); remove or fix "
            "them (training on them teaches the model to stop at once)."
        )
