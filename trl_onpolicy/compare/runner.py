"""Train several methods on the same data and budget, sweep learning rates and seeds, evaluate each unit, report them.

``trl-onpolicy compare --config recipes/compare/<recipe>.yaml`` (flags after the config override top-level keys:
``--output_dir DIR``, ``--methods base,sft,idft``, ``--sweep '{seeds: [0]}'``). One YAML names:

- ``model_name_or_path``: the starting model of every method (a folder, Hub name, or ``embedded:smollm2-135m-instruct``);
- ``data``: the SFT corpus (``task`` of `trl_onpolicy.data.datasets.math_word_problems`, ``n``, ``seed``, ``task_kwargs``; or
  ``path`` to a local file/folder with prompt, completion and answer columns);
- ``eval``: the evaluation sets (`trl_onpolicy.eval.evaluation.EvalSet` mappings: in-domain, out-of-domain, retention) and
  the generation settings (`trl_onpolicy.eval.evaluation.EvalConfig` fields);
- ``methods``: any of `METHODS`, as names or mappings ``{name, label, args, learning_rates, seeds}`` (``args`` go to
  the method's trainer config, e.g. ``{beta: 0.1}``; ``learning_rates`` replaces the sweep's grid for this method;
  ``label`` tells two runs of one method apart);
- ``sweep``: ``seeds`` (every unit is trained once per seed) and ``learning_rates`` (the grid every method uses unless
  it gives its own ``learning_rates``); without it: one seed (``budget.seed``) and one rate (``budget.learning_rate``);
- ``budget``: what every method shares: the same training prompts, ``max_steps`` optimizer steps (and optionally a
  ``max_tokens`` cap on non-padding tokens), ``per_device_train_batch_size``, ``gradient_accumulation_steps``,
  ``max_length`` and the optimizer settings;
- ``metrics``: forgetting and learning signals next to accuracy (`MetricsSpec`): KL(base || trained) on held-out
  in-domain prompts and on general prompts, and the held-out NLL of reference solutions;
- ``num_threads``: torch CPU threads (on a shared CPU, 1 can be many times faster than the default);
- ``only``: method labels (a list or ``--only base,sft``) to run now out of the recipe's ``methods``, keeping their
  settings (e.g. a first pass before the best rates of the other methods are known);
- ``contrasts``: extra paired comparisons for the report, ``["idft vs dft", "idft_online vs idft"]``: a − b on each
  seed both finished, at each learning rate both ran (the report always pairs every method with SFT);
- ``shard``: ``"auto"`` lets any number of processes share the sweep: each takes the next unit that is neither
  finished nor held by another process (start one per core with ``--shard auto``; they balance themselves);
  ``"i/n"`` runs every n-th unit starting at i (a fixed split). A unit is claimed with a lock file under
  ``output_dir/.claims`` while it runs, so two processes never train the same unit, whatever their shard settings; a
  process's final report includes every unit finished by then;
- ``pairs`` (DPO/SimPO, `trl_onpolicy.eval.preferences.PairConfig` fields), ``hinted`` (`trl_onpolicy.hinted.realign.RealignConfig`
  fields for the Hinted-Decoding corpus), ``online`` (`trl_onpolicy.trainer.online.HintedDataCollator` keyword
  arguments: decoding settings of online IDFT), ``sdft`` (settings of `trl_onpolicy.trainer.sdft.train_sdft`).

Units. Every (method, learning rate, seed) is one unit, trained from the same base weights on the same prompts in the
same data order for a given seed (``seed`` and ``data_seed`` of the trainer), so units of two methods with the same
seed are paired. ``base`` is evaluated once (once per seed when evaluation samples, ``eval.temperature > 0``).
``sft``/``dft``/``eaft``/``idft`` train with `IDFTTrainer` (token_loss nll/dft/eaft/idft) on the reference solutions;
``sft_hinted``/``idft_hinted`` train on the corpus re-aligned to the base model with Hinted Decoding (built once,
cached); ``idft_online`` re-aligns every batch with the current weights; ``sdft`` is TRL's self-distillation
(`trl.experimental.sdft.SDFTTrainer` through `trl_onpolicy.trainer.sdft`, privileged context = the reference solution);
``dpo`` (TRL's `DPOTrainer`, reference model = a frozen copy of the base) and ``simpo`` (TRL's `CPOTrainer` with
``loss_type="simpo", cpo_alpha=0``) train on preference pairs (chosen = reference, rejected = the base model's own wrong
sample; built once, cached).

Output (``output_dir``): ``methods/<label>/lr<rate>_seed<seed>/result.json`` (one per unit, written atomically, with
``eval/`` per-sample jsonl beside it), ``corpora/`` (pairs, re-aligned corpus, DDT phi, the base model's samples for
the KL estimates: each with the fingerprint of what produced it), ``results.json``, ``results.md``, ``frontier.png``
(in-domain gain against KL to base, and retention against in-domain gain) and ``compare_accuracy.png``.
Aggregation, pairing and plots live in `trl_onpolicy.compare.report`.

Checks before any work: the whole recipe (unknown keys, numeric fields through `trl_onpolicy.utils.validation`, method names,
each method's trainer configuration), the model folder, the training data, every evaluation set and metric prompt set,
and the output folder. Nothing is trained or written when one fails.

Resuming and staleness: run the same command again. A unit whose result.json says ``"status": "ok"`` and whose
recorded fingerprint (start-model weights, training data, evaluation sets and settings, metric settings, and every
setting of the unit: method, args, learning rate, seed, budget, corpus settings) equals this run's is skipped. A unit
whose fingerprint differs is recomputed (the message says what changed); old results are never reported under a new
configuration. A failed unit is retried (``rerun_failed: false`` keeps the failure). A unit that raises is recorded as
failed with its error and the others go on; the command then exits with status 1. ``--report_only true`` runs
nothing: it writes results.md, results.json and the plots from the units that have finished under this configuration
(an interim report of a study still in progress; its exit status is 1 while units are missing).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import gc
import importlib
import json
import math
import os
import shutil
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from trl_onpolicy.eval.evaluation import EvalConfig, EvalSet, evaluate, load_eval_set
from trl_onpolicy.utils.io import file_lock, read_json, write_json_atomic
from trl_onpolicy.utils.fingerprint import changed_keys, data_fingerprint, model_fingerprint, settings_fingerprint
from trl_onpolicy.utils.validation import (
    COUNT,
    NON_NEGATIVE,
    OPTIONAL_COUNT,
    POSITIVE,
    PROBABILITY_OPEN_LOW,
    Range,
    check_fields,
    check_hub_model,
    check_input_path,
    check_model_source,
    check_output_path,
    check_value,
    invalid,
    looks_like_local_path,
)

METHODS = ("base", "sft", "dft", "eaft", "idft", "sft_hinted", "idft_hinted", "idft_online", "sdft", "dpo", "simpo")
TOKEN_LOSS = {"sft": "nll", "dft": "dft", "eaft": "eaft", "idft": "idft", "sft_hinted": "nll", "idft_hinted": "idft"}
# keys that belong to the shared budget or the sweep: a method's args may not change them
BUDGET_KEYS = ("max_steps", "per_device_train_batch_size", "gradient_accumulation_steps", "seed", "data_seed", "max_length")
GENERAL_PROMPTS = Path(__file__).parents[1] / "eval" / "resources" / "general_prompts.jsonl"

SEED = Range(lo=0, integer=True)
LEARNING_RATE = Range(lo=0, lo_open=True, hi=1)
BUDGET_RULES = {
    "max_steps": COUNT, "max_tokens": OPTIONAL_COUNT, "per_device_train_batch_size": COUNT,
    "gradient_accumulation_steps": COUNT, "max_length": COUNT, "learning_rate": LEARNING_RATE,
    "warmup_steps": Range(lo=0, integer=True), "weight_decay": NON_NEGATIVE, "max_grad_norm": NON_NEGATIVE, "seed": SEED,
}
EVAL_RULES = {"num_samples": COUNT, "temperature": NON_NEGATIVE, "top_p": PROBABILITY_OPEN_LOW, "max_new_tokens": COUNT,
              "batch_size": COUNT, "seed": SEED, "check_workers": COUNT}
DATA_RULES = {"n": OPTIONAL_COUNT, "seed": SEED, "max_solution_chars": OPTIONAL_COUNT}
# numeric trainer arguments a method's `args` commonly set (the trainer config then checks the rest)
ARG_RULES = {"learning_rate": LEARNING_RATE, "weight_decay": NON_NEGATIVE, "max_grad_norm": NON_NEGATIVE,
             "beta": POSITIVE, "simpo_gamma": Range(), "cpo_alpha": NON_NEGATIVE, "temperature": POSITIVE,
             "idft_alpha": Range(), "eaft_top_k": COUNT, "warmup_ratio": Range(lo=0, hi=1)}


class MethodUnavailable(RuntimeError):
    """A method whose implementation (module or optional package) is not available in this installation."""


# ----------------------------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class DataSpec:
    """The training corpus.

    Args:
        task: a `trl_onpolicy.data.datasets.TASKS` task (worked solutions generated offline), used when ``path`` is unset.
        n: number of training problems (the same prompts for every method).
        seed: generator seed.
        task_kwargs: reasoning-gym settings of the task.
        answer_format: ``"gsm"`` (``#### N``) or ``"boxed"``.
        max_solution_chars: skip problems whose worked solution is longer.
        path: a local file or saved dataset folder with ``prompt``, ``completion`` and ``answer`` columns instead.
    """

    task: str = field(default="chain_sum", metadata={"help": "reasoning-gym task of trl_onpolicy.data.datasets.TASKS."})
    n: int | None = field(default=64, metadata={"help": "Number of training problems."})
    seed: int = field(default=0, metadata={"help": "Generator seed of the training problems."})
    task_kwargs: dict = field(default_factory=dict, metadata={"help": "reasoning-gym settings of the task."})
    answer_format: str = field(default="gsm", metadata={"help": "'gsm' (#### N) or 'boxed'."})
    max_solution_chars: int | None = field(default=None, metadata={"help": "Skip longer worked solutions."})
    path: str | None = field(default=None, metadata={"help": "Local prompt/completion/answer data instead of a task."})


@dataclass
class Budget:
    """What every method shares.

    Args:
        max_steps: optimizer steps per unit.
        max_tokens: optional cap on trained (non-padding) tokens; a unit stops at whichever limit comes first.
        per_device_train_batch_size / gradient_accumulation_steps: samples per step (DPO/SimPO: pairs per step).
        max_length: truncation length of training sequences.
        learning_rate: the rate when neither ``sweep.learning_rates`` nor a method's ``learning_rates`` is given.
        lr_scheduler_type / warmup_steps / weight_decay / max_grad_norm: optimizer settings.
        gradient_checkpointing: off by default (small models on CPU train faster without it).
        seed: the seed when ``sweep.seeds`` is not given.
    """

    max_steps: int = field(default=8, metadata={"help": "Optimizer steps per unit."})
    max_tokens: int | None = field(default=None, metadata={"help": "Optional cap on trained non-padding tokens."})
    per_device_train_batch_size: int = field(default=2, metadata={"help": "Samples (or pairs) per device and step."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    max_length: int = field(default=256, metadata={"help": "Truncation length of training sequences."})
    learning_rate: float = field(default=1e-5, metadata={"help": "Rate used when no sweep grid is given."})
    lr_scheduler_type: str = field(default="constant", metadata={"help": "transformers scheduler name."})
    warmup_steps: int = field(default=0, metadata={"help": "Linear warm-up steps."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (0 = off)."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Recompute activations in backward."})
    seed: int = field(default=0, metadata={"help": "Seed used when sweep.seeds is not given."})


@dataclass
class SweepSpec:
    """The grid of units: every method x its learning rates x seeds.

    Args:
        seeds: training seeds (model init of new heads, data order, sampling); defaults to ``[budget.seed]``.
        learning_rates: the grid of every method that gives no ``learning_rates`` of its own; defaults to
            ``[budget.learning_rate]``.
    """

    seeds: list | None = field(default=None, metadata={"help": "Seeds; every unit runs once per seed."})
    learning_rates: list | None = field(default=None, metadata={"help": "Learning-rate grid shared by the methods."})


@dataclass
class MetricsSpec:
    """Signals measured on every unit next to accuracy (all forward-only, batched; `trl_onpolicy.eval.forgetting`).

    KL(base || trained) is estimated per token on responses the base model samples at temperature 1 (generated once
    per study and cached in ``corpora/``) for two prompt sets: held-out in-domain prompts (``kl_prompts``, an
    `EvalSet` mapping; default: the training task's test split) and general non-math prompts (``general_prompts``: a
    jsonl file with a ``prompt`` column; default: the everyday instructions shipped in
    ``trl_onpolicy/eval/resources/general_prompts.jsonl``). The held-out NLL is the mean per-token negative log-likelihood
    of reference solutions the model was not trained on (``nll_path``, or the training task's test split).

    Args:
        kl: measure KL to the base model.
        kl_prompts: `EvalSet` fields of the in-domain KL prompts (``name`` optional); defaults to the training task.
        general_prompts: jsonl of general prompts (``prompt``: a string or chat messages); None = the shipped file.
        general_n: general prompts used (the first n).
        kl_max_new_tokens: length of the base model's samples.
        sample_seed: seed of the base model's samples.
        nll: measure held-out NLL of reference solutions.
        nll_n: held-out solutions scored.
        nll_seed: generator seed of the held-out solutions (test split of the training task).
        nll_path: a local prompt/completion file of held-out solutions instead (needed when ``data.path`` is set).
        batch_size: sequences per forward pass.
    """

    kl: bool = field(default=True, metadata={"help": "Measure KL(base || trained)."})
    kl_prompts: dict = field(default_factory=dict, metadata={"help": "EvalSet fields of the in-domain KL prompts."})
    general_prompts: str | None = field(default=None, metadata={"help": "jsonl of general prompts (None = shipped)."})
    general_n: int = field(default=64, metadata={"help": "General prompts used."})
    kl_n: int = field(default=64, metadata={"help": "In-domain KL prompts used (when kl_prompts gives no n)."})
    kl_max_new_tokens: int = field(default=128, metadata={"help": "Length of the base model's samples."})
    sample_seed: int = field(default=0, metadata={"help": "Seed of the base model's samples."})
    nll: bool = field(default=True, metadata={"help": "Measure held-out NLL of reference solutions."})
    nll_n: int = field(default=128, metadata={"help": "Held-out reference solutions scored."})
    nll_seed: int = field(default=30_000, metadata={"help": "Generator seed of the held-out solutions."})
    nll_path: str | None = field(default=None, metadata={"help": "Local prompt/completion file of held-out solutions."})
    batch_size: int = field(default=8, metadata={"help": "Sequences per forward pass."})


METRICS_RULES = {"general_n": COUNT, "kl_n": COUNT, "kl_max_new_tokens": COUNT, "sample_seed": SEED, "nll_n": COUNT,
                 "nll_seed": SEED, "batch_size": COUNT}


@dataclass
class MethodSpec:
    """One method of the comparison.

    Args:
        name: one of `METHODS`.
        label: report name (defaults to ``name``); tells two runs of one method apart. Entries with the same label
            and the same name and args add their rates and seeds to one method (e.g. a rate scan at seed 0, then the
            best rate at every seed); a unit both entries name runs once.
        args: trainer-config settings of this method (budget keys are refused: every method shares the budget).
        learning_rates: this method's grid (replaces ``sweep.learning_rates``); e.g. its best rate after a first pass.
        seeds: this method's seeds (replaces ``sweep.seeds``; pairing uses the seeds two methods share).
    """

    name: str
    label: str | None = None
    args: dict = field(default_factory=dict)
    learning_rates: list | None = None
    seeds: list | None = None

    def __post_init__(self):
        if self.name not in METHODS:
            raise ValueError(f"Unknown method {self.name!r}; choose from {list(METHODS)}.")
        self.label = self.label or self.name
        if not isinstance(self.args, dict):
            raise ValueError(f"methods[{self.label}].args must be a mapping, got {self.args!r}.")
        bad = sorted(k for k in self.args if k in BUDGET_KEYS)
        if bad:
            raise ValueError(
                f"Method {self.label!r} sets {bad} in its args: these belong to the shared `budget` (every method uses "
                "the same), so set them there."
            )
        if "learning_rate" in self.args:
            if self.learning_rates is not None:
                raise ValueError(f"methods[{self.label}] gives both args.learning_rate and learning_rates; keep one.")
            self.args = dict(self.args)
            self.learning_rates = [self.args.pop("learning_rate")]
        owner = f"methods[{self.label}].args"
        check_fields(self.args, ARG_RULES, owner=owner)
        for key, value in self.args.items():
            if isinstance(value, float) and not math.isfinite(value):
                raise invalid(owner, key, value, "expected a finite number")
        self.learning_rates = _number_list(self.learning_rates, f"methods[{self.label}]", "learning_rates", LEARNING_RATE)
        self.seeds = _number_list(self.seeds, f"methods[{self.label}]", "seeds", SEED)


def _number_list(values, owner: str, name: str, rule: Range) -> list | None:
    if values is None:
        return None
    if isinstance(values, (int, float)) and not isinstance(values, bool):
        values = [values]
    if not isinstance(values, (list, tuple)) or not values:
        raise invalid(owner, name, values, "expected a non-empty list of numbers")
    for i, v in enumerate(values):
        check_value(f"{name}[{i}]", v, rule, owner)
    if len(set(values)) != len(values):
        raise invalid(owner, name, values, "expected distinct values")
    return [int(v) for v in values] if rule.integer else [float(v) for v in values]


@dataclass
class CompareConfig:
    model_name_or_path: str
    output_dir: str
    methods: list = field(default_factory=lambda: ["base", "sft", "idft"])
    data: DataSpec = field(default_factory=DataSpec)
    budget: Budget = field(default_factory=Budget)
    sweep: SweepSpec = field(default_factory=SweepSpec)
    metrics: MetricsSpec = field(default_factory=MetricsSpec)
    eval: dict = field(default_factory=dict)
    pairs: dict = field(default_factory=dict)
    hinted: dict = field(default_factory=dict)
    online: dict = field(default_factory=dict)
    sdft: dict = field(default_factory=dict)
    phi: dict = field(default_factory=lambda: {"enabled": True, "max_samples": 128, "batch_size": 8})
    dtype: str = "float32"
    rerun_failed: bool = True
    report_only: bool = False
    title: str | None = None
    num_threads: int | None = None
    shard: str | None = None
    contrasts: list = field(default_factory=list)

    # parsed forms
    eval_sets: list = field(default_factory=list, repr=False)
    eval_config: EvalConfig = field(default_factory=EvalConfig, repr=False)
    method_specs: list = field(default_factory=list, repr=False)

    @property
    def shard_index(self) -> tuple[int, int]:
        """``(i, n)`` of ``shard: "i/n"``: this process runs units i, i + n, i + 2n, ... (0-based) of the sweep, so n
        processes (one per core, ``num_threads: 1``) share one output folder; ``(0, 1)`` without sharding and with
        ``shard: "auto"`` (every unit is open to this process; claims keep processes apart)."""
        if not self.shard or str(self.shard) == "auto":
            return 0, 1
        try:
            i, n = (int(x) for x in str(self.shard).split("/"))
        except ValueError:
            raise invalid(None, "shard", self.shard, "expected 'auto' or 'i/n' with 0 <= i < n, e.g. '0/2'") from None
        if not 0 <= i < n:
            raise invalid(None, "shard", self.shard, "expected 'auto' or 'i/n' with 0 <= i < n, e.g. '0/2'")
        return i, n

    def seeds_of(self, spec: MethodSpec) -> list[int]:
        return spec.seeds or self.sweep.seeds or [self.budget.seed]

    def rates_of(self, spec: MethodSpec) -> list[float]:
        return spec.learning_rates or self.sweep.learning_rates or [self.budget.learning_rate]


def _strict(cls, values: Any, where: str):
    if values is None:
        return cls()
    if not isinstance(values, dict):
        raise ValueError(f"`{where}` must be a mapping of {cls.__name__} fields, got {type(values).__name__}.")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        import difflib

        hints = [f"{u!r} (did you mean {difflib.get_close_matches(u, known, 1)[0]!r}?)" if difflib.get_close_matches(u, known, 1) else repr(u) for u in unknown]
        raise ValueError(f"Unknown key(s) in `{where}`: {', '.join(hints)}. Known keys: {sorted(known)}.")
    try:
        return cls(**values)
    except ValueError as e:  # name the recipe key (`eval.temperature`), not the class the block builds
        message = str(e)
        for prefix in {f"{cls.__name__}.", *(f"{base.__name__}." for base in cls.__mro__)}:
            if message.startswith(prefix):
                raise ValueError(f"{where}.{message[len(prefix):]}") from None
        raise


TOP_KEYS = ("model_name_or_path", "output_dir", "methods", "data", "budget", "sweep", "metrics", "eval", "pairs",
            "hinted", "online", "sdft", "phi", "dtype", "rerun_failed", "report_only", "title", "num_threads", "shard", "only", "env",
            "contrasts")


def _parse_contrasts(raw, labels: list[str]) -> list[tuple[str, str]]:
    """``contrasts: ["idft vs dft", ...]`` -> [("idft", "dft"), ...], both sides method labels of the recipe."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise invalid(None, "contrasts", raw, "expected a list such as ['idft vs dft', 'idft_online vs idft']")
    out = []
    for i, item in enumerate(raw):
        parts = [x.strip() for x in item.split(" vs ")] if isinstance(item, str) else []
        if len(parts) != 2 or any(x not in labels for x in parts) or parts[0] == parts[1]:
            raise invalid(None, f"contrasts[{i}]", item, f"expected 'a vs b' with two method labels of this recipe, from {labels}")
        out.append((parts[0], parts[1]))
    return out


def parse_config(raw: dict) -> CompareConfig:
    """Validate a compare recipe (a mapping, e.g. loaded from YAML); errors name the offending key. Nothing is loaded
    or written here; `Comparison.validate` checks the files and data before any work."""
    if not isinstance(raw, dict):
        raise ValueError("A compare recipe must be a YAML mapping.")
    unknown = sorted(set(raw) - set(TOP_KEYS))
    if unknown:
        raise ValueError(f"Unknown top-level key(s) {unknown} in the compare recipe; known keys: {list(TOP_KEYS)}.")
    for key in ("model_name_or_path", "output_dir"):
        if not raw.get(key) or not isinstance(raw[key], str):
            raise ValueError(f"The compare recipe needs `{key}` (a string).")
    for key in ("pairs", "hinted", "online", "sdft", "phi", "env"):
        if raw.get(key) is not None and not isinstance(raw[key], dict):
            raise ValueError(f"`{key}` must be a mapping, got {type(raw[key]).__name__}.")
    for key, value in (raw.get("env") or {}).items():
        os.environ[str(key)] = str(value)
    eval_raw = raw.get("eval") or {}
    if not isinstance(eval_raw, dict):
        raise ValueError(f"`eval` must be a mapping, got {type(eval_raw).__name__}.")
    eval_raw = dict(eval_raw)
    sets = eval_raw.pop("sets", None)
    if not sets or not isinstance(sets, list):
        raise ValueError("The compare recipe needs `eval.sets`: a list of evaluation sets (in-domain, ood, retention).")
    budget = _strict(Budget, raw.get("budget"), "budget")
    check_fields(budget, BUDGET_RULES, owner="budget")
    eval_raw.setdefault("seed", budget.seed)
    cfg = CompareConfig(
        model_name_or_path=raw["model_name_or_path"],
        output_dir=raw["output_dir"],
        methods=raw.get("methods") or ["base"],
        data=_strict(DataSpec, raw.get("data"), "data"),
        budget=budget,
        sweep=_strict(SweepSpec, raw.get("sweep"), "sweep"),
        metrics=_strict(MetricsSpec, raw.get("metrics"), "metrics"),
        eval=eval_raw,
        pairs=dict(raw.get("pairs") or {}),
        hinted=dict(raw.get("hinted") or {}),
        online=dict(raw.get("online") or {}),
        sdft=dict(raw.get("sdft") or {}),
        phi={"enabled": True, "max_samples": 128, "batch_size": 8, **(raw.get("phi") or {})},
        dtype=raw.get("dtype", "float32"),
        rerun_failed=bool(raw.get("rerun_failed", True)),
        report_only=bool(raw.get("report_only", False)),
        title=raw.get("title"),
        num_threads=raw.get("num_threads"),
        shard=None if raw.get("shard") is None else str(raw["shard"]),
    )
    cfg.shard_index  # noqa: B018 - checks the value
    check_fields(cfg.data, DATA_RULES, owner="data")
    check_fields(cfg.metrics, METRICS_RULES, owner="metrics")
    check_fields(cfg.phi, {"max_samples": OPTIONAL_COUNT, "batch_size": COUNT}, owner="phi")
    check_value("num_threads", cfg.num_threads, OPTIONAL_COUNT)
    if cfg.dtype not in ("float32", "bfloat16", "float16"):
        raise invalid(None, "dtype", cfg.dtype, "choose one of ['float32', 'bfloat16', 'float16']")
    cfg.sweep.seeds = _number_list(cfg.sweep.seeds, "sweep", "seeds", SEED)
    cfg.sweep.learning_rates = _number_list(cfg.sweep.learning_rates, "sweep", "learning_rates", LEARNING_RATE)
    for i, s in enumerate(sets):
        if isinstance(s, dict) and "name" not in s:
            raise ValueError(f"eval.sets[{i}] needs a `name`.")
    cfg.eval_sets = [EvalSet.from_spec(s) for s in sets]
    names = [s.name for s in cfg.eval_sets]
    if len(set(names)) != len(names):
        raise ValueError(f"eval.sets names must be unique; got {names}.")
    cfg.eval_config = _strict(EvalConfig, eval_raw, "eval")
    check_fields(cfg.eval_config, EVAL_RULES, owner="eval")
    for s in cfg.eval_sets:
        check_fields(s, {"n": OPTIONAL_COUNT, "max_new_tokens": OPTIONAL_COUNT}, owner=f"eval.sets[{s.name}]")
    if not isinstance(cfg.metrics.kl_prompts, dict):
        raise invalid("metrics", "kl_prompts", cfg.metrics.kl_prompts, "expected a mapping of EvalSet fields")
    if cfg.metrics.kl_prompts:
        default_task = {} if {"task", "path"} & set(cfg.metrics.kl_prompts) else {"task": cfg.data.task}
        EvalSet.from_spec({"name": "kl_in_domain", **default_task, **cfg.metrics.kl_prompts})
    specs = []
    methods = cfg.methods.split(",") if isinstance(cfg.methods, str) else cfg.methods
    if not isinstance(methods, list):
        raise ValueError(f"`methods` must be a list (or a comma-separated string), got {methods!r}.")
    for m in methods:
        if isinstance(m, str):
            specs.append(MethodSpec(name=m.strip()))
        elif isinstance(m, dict):
            specs.append(_strict(MethodSpec, m, f"methods[{m.get('name', '?')}]"))
        else:
            raise ValueError(f"A method must be a name or a mapping {{name, label, args, learning_rates, seeds}}; got {m!r}.")
    labels = list(dict.fromkeys(s.label for s in specs))
    for spec in specs:  # entries sharing a label add units to one method: they must train the same way
        first = next(s for s in specs if s.label == spec.label)
        if (spec.name, spec.args) != (first.name, first.args):
            raise ValueError(
                f"Two `methods` entries use the label {spec.label!r} with different settings ({first.name} {first.args} "
                f"vs {spec.name} {spec.args}): give one of them its own `label`, or the same name and args to add "
                "learning rates/seeds to one method.")
    if not specs:
        raise ValueError("`methods` is empty: name at least one method.")
    cfg.contrasts = _parse_contrasts(raw.get("contrasts"), labels)
    only = raw.get("only")
    if only is not None:
        only = [x.strip() for x in only.split(",")] if isinstance(only, str) else only
        unknown = [x for x in only if x not in labels] if isinstance(only, list) else [only]
        if unknown or not only:
            raise invalid(None, "only", raw.get("only"), f"expected method labels of this recipe, from {labels}")
        specs = [s for s in specs if s.label in only]
    cfg.method_specs = specs
    if cfg.pairs:
        from trl_onpolicy.eval.preferences import PairConfig

        _strict(PairConfig, cfg.pairs, "pairs")
    if cfg.hinted:
        fallback = cfg.hinted.get("fallback", "reference")
        if fallback not in ("reference", "drop"):
            raise invalid("hinted", "fallback", fallback, "choose one of ['reference', 'drop']")
    return cfg


def load_config_file(path: str | Path, overrides: dict | None = None) -> CompareConfig:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Compare recipe {str(path)!r} does not exist.")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ValueError(f"Compare recipe {str(path)!r} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"Compare recipe {str(path)!r} must be a YAML mapping, got {type(raw).__name__}.")
    raw.update(overrides or {})
    return parse_config(raw)


# ----------------------------------------------------------------------------------------------------------------------
# Small utilities
# ----------------------------------------------------------------------------------------------------------------------


def _rate(lr: float) -> str:
    """A learning rate as short text: 1e-4, 2.5e-5."""
    mantissa, exponent = f"{lr:.3e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def _locked(name):
    """Run a `Comparison` cache builder under ``corpora/.<name>.lock`` (``name``: a string, or a function of the
    method's arguments)."""

    def wrap(fn):
        @functools.wraps(fn)
        def inner(self, *args, **kwargs):
            lock = name(*args) if callable(name) else name
            with file_lock(self.out / "corpora" / f".{lock}.lock"):
                return fn(self, *args, **kwargs)

        return inner

    return wrap


@dataclass
class Unit:
    """One (method, learning rate, seed) of the sweep; ``lr`` is None for ``base``, ``seed`` None for a base model
    evaluated greedily (it depends on no seed)."""

    spec: MethodSpec
    lr: float | None
    seed: int | None

    @property
    def key(self) -> str:
        parts = [self.spec.label] + ([f"lr={_rate(self.lr)}"] if self.lr is not None else [])
        return "/".join(parts + ([f"seed={self.seed}"] if self.seed is not None else []))

    @property
    def folder_name(self) -> str:
        parts = ([f"lr{_rate(self.lr)}"] if self.lr is not None else []) + ([f"seed{self.seed}"] if self.seed is not None else [])
        return "_".join(parts) or "unit"


class PeakMemory:
    """Peak resident memory of this process while the block runs (sampled every ``interval`` s by a thread), and the
    CUDA peak allocation when a GPU is used. Values in MiB."""

    def __init__(self, interval: float = 0.05):
        self.interval = interval
        self.peak_rss = 0
        self._stop = threading.Event()

    @staticmethod
    def _rss() -> int:
        try:
            import psutil

            return psutil.Process().memory_info().rss
        except ImportError:  # Linux fallback
            with open("/proc/self/statm") as fh:
                return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self):
        while not self._stop.is_set():
            self.peak_rss = max(self.peak_rss, self._rss())
            self._stop.wait(self.interval)

    def __enter__(self):
        self.peak_rss = self._rss()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_rss = max(self.peak_rss, self._rss())
        self.peak_rss_mib = self.peak_rss / 2**20
        self.peak_cuda_mib = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
        return False


def _batch_tokens(inputs) -> int:
    """Non-padding tokens of one training batch: its attention masks, else every ``input_ids`` position."""
    # SFT/DPO batches carry one `attention_mask` over whole sequences; CPO/SimPO batches carry chosen_/rejected_
    # attention_mask (prompt included) beside prompt_attention_mask, which would count prompts twice; SDFT's prepared
    # batches carry the student's prompt_mask and completion_mask (and the teacher's, which is not what is trained)
    if torch.is_tensor(inputs.get("attention_mask")):
        masks = [inputs["attention_mask"]]
    elif torch.is_tensor(inputs.get("completion_mask")) and torch.is_tensor(inputs.get("prompt_mask")):
        masks = [inputs["prompt_mask"], inputs["completion_mask"]]
    else:
        masks = [v for k, v in inputs.items()
                 if k.endswith("attention_mask") and not k.startswith(("prompt_", "teacher_")) and torch.is_tensor(v)]
    if masks:
        return int(sum(int(m.sum()) for m in masks))
    return int(inputs["input_ids"].numel()) if "input_ids" in inputs else 0


def _token_counter_callback(trainer, max_tokens: int | None):
    """Count non-padding tokens of every training batch by wrapping ``trainer.training_step`` (or, for trainers whose
    steps receive raw rows and build the batch in ``_prepare_inputs``, like SDFT's on-policy rollouts, that method);
    stop training once ``max_tokens`` is reached."""
    from collections.abc import Mapping

    from transformers import TrainerCallback

    counter = {"tokens": 0}
    original = trainer.training_step
    original_prepare = getattr(trainer, "_prepare_inputs", None)
    raw_rows = {"active": False}

    def training_step(model, inputs, *args, **kwargs):
        raw_rows["active"] = not isinstance(inputs, Mapping)
        if not raw_rows["active"]:
            counter["tokens"] += _batch_tokens(inputs)
        try:
            return original(model, inputs, *args, **kwargs)
        finally:
            raw_rows["active"] = False

    def prepare_inputs(inputs, *args, **kwargs):
        batch = original_prepare(inputs, *args, **kwargs)
        if raw_rows["active"] and isinstance(batch, Mapping):
            counter["tokens"] += _batch_tokens(batch)
        return batch

    trainer.training_step = training_step
    if original_prepare is not None:
        trainer._prepare_inputs = prepare_inputs

    class StopAtTokens(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if max_tokens is not None and counter["tokens"] >= max_tokens:
                control.should_training_stop = True
            return control

    trainer.add_callback(StopAtTokens())
    return counter


# ----------------------------------------------------------------------------------------------------------------------
# The comparison
# ----------------------------------------------------------------------------------------------------------------------


class Comparison:
    """One compare run: shared data, cached corpora and base samples, and one `run_unit` per (method, rate, seed)."""

    def __init__(self, config: CompareConfig, progress: bool = True):
        self.cfg = config
        self.out = Path(config.output_dir)
        self.progress = progress
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self._model_path = None
        self._train_rows = None
        self._fp: dict[str, str] = {}
        self._prompt_sets: dict[str, list] = {}
        self._nll_rows = None
        self._base_hidden: dict[str, list] = {}  # the base side of the KL, computed once per process and prompt set

    # ---- model and data ------------------------------------------------------------------------------------------

    @property
    def model_path(self) -> str:
        if self._model_path is None:
            path = self.cfg.model_name_or_path
            if isinstance(path, str) and path.startswith("embedded:"):
                from trl_onpolicy.utils.models import resolve_model_path

                path = resolve_model_path(path)
            self._model_path = path
        return self._model_path

    def load_base(self):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        dtype = getattr(torch, self.cfg.dtype)
        model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=dtype).to(self.device)
        tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        model.eval()
        return model, tokenizer

    def train_rows(self) -> list[dict]:
        """The training problems (identical for every unit)."""
        if self._train_rows is None:
            d = self.cfg.data
            if d.path:
                from trl_onpolicy.data.datasets import load_sft_dataset

                check_input_path(d.path, "data.path")
                rows = list(load_sft_dataset(d.path))
                rows = rows[: d.n] if d.n else rows
            else:
                from trl_onpolicy.data.datasets import math_word_problems

                rows = list(
                    math_word_problems(
                        d.n, seed=d.seed, task=d.task, split="train", answer_format=d.answer_format,
                        max_solution_chars=d.max_solution_chars, **d.task_kwargs,
                    )
                )
            if not rows:
                raise ValueError(f"The training data ({d.path or d.task}) is empty.")
            for col in ("prompt", "completion"):
                if col not in rows[0]:
                    raise ValueError(f"The training data needs a `{col}` column (TRL prompt-completion); it has {sorted(rows[0])}.")
            empty = [i for i, r in enumerate(rows) if not _text_of(r.get("completion"))]
            if empty:
                raise ValueError(f"The training data ({d.path or d.task}) has {len(empty)} row(s) with an empty completion "
                                 f"(first: row {empty[0]}); remove them.")
            self._train_rows = rows
        return self._train_rows

    def sft_dataset(self, rows=None):
        from datasets import Dataset

        rows = self.train_rows() if rows is None else rows
        return Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows])

    def prompt_set(self, which: str) -> list:
        """Prompts of the KL estimates: ``"in_domain"`` (held-out prompts of the training task) or ``"general"``."""
        if which not in self._prompt_sets:
            m = self.cfg.metrics
            if which == "in_domain":
                d = self.cfg.data
                spec = {"name": "kl_in_domain", "n": m.kl_n, "seed": 20_000, **m.kl_prompts}
                if "task" not in m.kl_prompts and "path" not in m.kl_prompts:
                    if d.path:
                        raise ValueError("metrics.kl_prompts needs a `task` or `path` when the training data is a local "
                                         "file (data.path): the held-out in-domain prompts cannot be drawn from it.")
                    spec.update(task=d.task, task_kwargs={**d.task_kwargs, **m.kl_prompts.get("task_kwargs", {})})
                prompts = [r["prompt"] for r in load_eval_set(EvalSet.from_spec(spec))]
            else:
                path = Path(m.general_prompts) if m.general_prompts else GENERAL_PROMPTS
                check_input_path(path, "metrics.general_prompts", must_be_dir=False)
                prompts = []
                for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except ValueError:
                        raise ValueError(f"metrics.general_prompts {str(path)!r} line {i} is not JSON.") from None
                    if not isinstance(row, dict) or not row.get("prompt"):
                        raise ValueError(f"metrics.general_prompts {str(path)!r} line {i} needs a non-empty `prompt`.")
                    p = row["prompt"]
                    prompts.append([{"role": "user", "content": p}] if isinstance(p, str) else p)
                prompts = prompts[: m.general_n]
            if not prompts:
                raise ValueError(f"The {which} KL prompt set is empty.")
            self._prompt_sets[which] = prompts
        return self._prompt_sets[which]

    def nll_rows(self) -> list[dict]:
        """Held-out reference solutions (prompt, completion) for the held-out NLL."""
        if self._nll_rows is None:
            m, d = self.cfg.metrics, self.cfg.data
            if m.nll_path:
                from trl_onpolicy.data.datasets import load_sft_dataset

                check_input_path(m.nll_path, "metrics.nll_path")
                rows = list(load_sft_dataset(m.nll_path))[: m.nll_n]
            elif d.path:
                raise ValueError("metrics.nll_path is needed when the training data is a local file (data.path): give "
                                 "held-out prompt/completion rows, or set metrics.nll: false.")
            else:
                from trl_onpolicy.data.datasets import math_word_problems

                rows = list(math_word_problems(m.nll_n, seed=m.nll_seed, task=d.task, split="test",
                                               answer_format=d.answer_format, max_solution_chars=d.max_solution_chars,
                                               **d.task_kwargs))
            if not rows or any(c not in rows[0] for c in ("prompt", "completion")):
                raise ValueError("The held-out NLL rows must be a non-empty set with `prompt` and `completion` columns.")
            self._nll_rows = [{"prompt": r["prompt"], "completion": r["completion"]} for r in rows]
        return self._nll_rows

    # ---- validation and fingerprints ------------------------------------------------------------------------------

    def validate(self) -> None:
        """Everything that can be checked without training, before any unit runs or any file is written: the model
        folder, the output folder, the training data, every evaluation and metric set, and every unit's trainer
        configuration. Raises ValueError / FileNotFoundError naming the field or file."""
        c = self.cfg
        if looks_like_local_path(c.model_name_or_path):
            check_input_path(c.model_name_or_path, "model_name_or_path", must_be_dir=True)
        check_model_source(c.model_name_or_path)  # a folder without weights
        check_hub_model(c.model_name_or_path)  # an id the Hub (or its offline cache) cannot provide
        inputs = [self.model_path, c.data.path, c.metrics.general_prompts, c.metrics.nll_path]
        inputs += [s.path for s in c.eval_sets if s.path]
        check_output_path(c.output_dir, "output_dir", inputs=[p for p in inputs if p])

        def load(where, fn, *args):
            try:
                return fn(*args)
            except (ImportError, RuntimeError) as err:  # e.g. a task that cannot give that many distinct problems
                raise ValueError(f"{where}: {err}") from None

        load("data", self.train_rows)
        for s in c.eval_sets:
            if not load(f"eval.sets[{s.name}]", load_eval_set, s):
                raise ValueError(f"eval.sets[{s.name}] is empty.")
        if c.metrics.kl or c.metrics.nll:
            try:
                from trl_onpolicy.eval import forgetting  # noqa: F401
            except ImportError as err:
                raise ValueError(f"metrics.kl / metrics.nll need trl_onpolicy.eval.forgetting ({err}); set them to false "
                                 "to compare accuracy only.") from None
        if c.metrics.kl:
            load("metrics (in-domain KL prompts)", self.prompt_set, "in_domain")
            load("metrics (general KL prompts)", self.prompt_set, "general")
        if c.metrics.nll:
            load("metrics (held-out NLL rows)", self.nll_rows)
        for unit in self.units():
            if unit.spec.name != "base":
                self.trainer_config(unit)
        self.fingerprints()

    def fingerprints(self) -> dict[str, str]:
        """Fingerprints shared by every unit: start-model weights, training data, evaluation, metrics."""
        if not self._fp:
            c = self.cfg
            eval_settings = {"config": {k: v for k, v in asdict(c.eval_config).items() if k not in ("progress", "check_workers")},
                             "sets": [asdict(s) for s in c.eval_sets],
                             "files": {s.name: data_fingerprint(s.path) for s in c.eval_sets if s.path}}
            metrics = {"settings": asdict(c.metrics)}
            if c.metrics.kl:
                metrics["prompts"] = {w: data_fingerprint(self.prompt_set(w)) for w in ("in_domain", "general")}
            if c.metrics.nll:
                metrics["nll_rows"] = data_fingerprint(self.nll_rows())
            self._fp = {"model": model_fingerprint(self.model_path), "data": data_fingerprint(self.train_rows()),
                        "eval": settings_fingerprint(eval_settings), "metrics": settings_fingerprint(metrics),
                        "dtype": c.dtype}
        return self._fp

    def unit_settings(self, unit: Unit) -> dict:
        """Every setting of one unit that changes its result (beyond the shared fingerprints)."""
        c, name = self.cfg, unit.spec.name
        if name == "base":
            return {"method": "base", "seed": unit.seed}
        budget = {k: v for k, v in asdict(c.budget).items() if k not in ("learning_rate", "seed")}
        settings = {"method": name, "args": unit.spec.args, "learning_rate": unit.lr, "seed": unit.seed, "budget": budget}
        if name in ("dpo", "simpo"):
            settings["pairs"] = self.pair_settings()
        if name.endswith("_hinted"):
            settings["hinted"] = self.hinted_settings()
        if name == "idft_online":
            settings["online"] = c.online
        if name == "sdft":
            settings["sdft"] = c.sdft
        return settings

    def unit_fingerprint(self, unit: Unit) -> dict:
        return {**self.fingerprints(), "settings": settings_fingerprint(self.unit_settings(unit))}

    # ---- cached corpora --------------------------------------------------------------------------------------------

    def _cache_fingerprint(self, **settings) -> dict:
        fp = self.fingerprints()
        return {"model": fp["model"], "data": fp["data"], "dtype": fp["dtype"], "settings": settings_fingerprint(settings)}

    def _stale(self, what: str, stored: dict | None, current: dict) -> bool:
        changed = changed_keys(stored, current)
        if changed and stored is not None:
            print(f"[compare] {what} was built from a different {', '.join(changed)}; rebuilding it", flush=True)
        return bool(changed)

    def pair_settings(self) -> dict:
        return {"seed": self.cfg.budget.seed, "batch_size": self.cfg.eval_config.batch_size,
                "max_new_tokens": self.cfg.eval_config.max_new_tokens, **self.cfg.pairs}

    def hinted_settings(self) -> dict:
        return {"seed": self.cfg.budget.seed, **self.cfg.hinted}

    @_locked("pairs")
    def preference_dataset(self, model, tokenizer):
        """Pairs from the base model's samples, built once into corpora/pairs (shared by dpo and simpo, every rate and
        seed); rebuilt when the model, the data or the pair settings changed."""
        from datasets import load_from_disk

        from trl_onpolicy.eval.preferences import PairConfig, make_preference_dataset

        folder = self.out / "corpora" / "pairs"
        fp = self._cache_fingerprint(**self.pair_settings())
        if (folder / "pairs_stats.json").is_file() and not self._stale("corpora/pairs", read_json(folder / "fingerprint.json"), fp):
            return load_from_disk(str(folder)), json.loads((folder / "pairs_stats.json").read_text())
        config = PairConfig(**self.pair_settings())
        tmp = folder.with_name(f".pairs.tmp-{os.getpid()}")
        dataset, stats = make_preference_dataset(model, tokenizer, self.train_rows(), config, tmp)
        write_json_atomic(tmp / "fingerprint.json", fp)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
        return load_from_disk(str(folder)), stats

    @_locked("hinted")
    def hinted_dataset(self, model, tokenizer):
        """The training corpus re-aligned to the base model with Hinted Decoding (trl_onpolicy.hinted.realign), cached.

        ``hinted.fallback`` decides what happens to prompts whose re-aligned response the realign filters drop
        (unfinished, wrong answer, low phi): ``"reference"`` (default) trains on the reference response for those
        prompts, so every method keeps the same prompts; ``"drop"`` trains on the kept responses only."""
        try:
            from trl_onpolicy.hinted.realign import RealignConfig, realign_dataset
        except ImportError as err:
            raise MethodUnavailable(f"Hinted-Decoding methods need trl_onpolicy.hinted.realign, which is not available ({err}).") from err
        from datasets import Dataset

        settings = self.hinted_settings()
        fallback = settings.pop("fallback", "reference")
        folder = self.out / "corpora" / "hinted"
        summary_path = folder / "summary.json"
        fp_path = self.out / "corpora" / "hinted_fingerprint.json"
        fp = self._cache_fingerprint(**settings)
        rows = self.train_rows()
        if not summary_path.is_file() or self._stale("corpora/hinted", read_json(fp_path), fp):
            if folder.exists():
                shutil.rmtree(folder)
            settings = {"model_name_or_path": str(self.model_path), "dataset_name": "compare:train", "output_dir": str(folder),
                        **settings}
            config = RealignConfig(**settings)
            data = Dataset.from_list([{k: r[k] for k in ("prompt", "question", "solution", "answer") if k in r} for r in rows])
            realign_dataset(model, tokenizer, data, config, progress=self.progress)
            write_json_atomic(fp_path, fp)
        summary = json.loads(summary_path.read_text())
        records = {}
        for shard in sorted((folder / "shards").glob("*.jsonl")):
            for line in shard.read_text().splitlines():
                if line.strip():
                    rec = json.loads(line)
                    records[rec["index"]] = rec
        out, kept = [], 0
        for i, row in enumerate(rows):
            rec = records.get(i)
            if rec is not None and rec.get("keep"):
                out.append({"prompt": row["prompt"], "completion": rec["completion"]})
                kept += 1
            elif fallback == "reference":
                out.append({"prompt": row["prompt"], "completion": row["completion"]})
        if not out:
            raise RuntimeError(f"Hinted Decoding kept no sample (summary: {json.dumps(summary)[:500]}); nothing to train on.")
        summary = {**summary, "fallback": fallback, "num_realigned_used": kept, "num_reference_used": len(out) - kept}
        return Dataset.from_list(out), summary

    @_locked(lambda name, *_: f"phi_{name}")
    def corpus_phi(self, name: str, dataset, model, tokenizer) -> dict | None:
        """Mean phi (DDT) of a training corpus under the base model, cached in corpora/phi_<name>.json."""
        if not self.cfg.phi.get("enabled", True):
            return None
        path = self.out / "corpora" / f"phi_{name}.json"
        fp = self._cache_fingerprint(corpus=data_fingerprint(dataset), phi=self.cfg.phi, max_length=self.cfg.budget.max_length)
        cached = read_json(path)
        if cached is not None and not self._stale(f"corpora/phi_{name}.json", cached.get("fingerprint"), fp):
            return cached
        n = min(len(dataset), int(self.cfg.phi.get("max_samples") or len(dataset)))
        subset = dataset.select(range(n)) if hasattr(dataset, "select") else dataset[:n]
        from trl_onpolicy.ddt.scoring import score_dataset

        result = score_dataset(model, tokenizer, subset, max_length=self.cfg.budget.max_length,
                               batch_size=int(self.cfg.phi.get("batch_size", 8)), progress=self.progress,
                               desc=f"DDT phi ({name})")
        s = result.summary
        info = {"mean_phi": s.get("mean_phi"), "std_phi": s.get("std_phi"), "num_tokens": s.get("num_tokens"),
                "num_samples": s.get("num_samples"), "source": "trl_onpolicy.ddt.scoring.score_dataset", "fingerprint": fp}
        write_json_atomic(path, info)
        return info

    @_locked(lambda which, *_: f"base_samples_{which}")
    def base_samples(self, which: str, base_model=None, tokenizer=None) -> list:
        """The base model's temperature-1 samples (token ids) for one KL prompt set: generated once per study into
        ``corpora/base_samples_<which>.json`` with the fingerprint of the model, the prompts and the sampling settings,
        and regenerated when any of them changed."""
        from trl_onpolicy.eval import forgetting

        m = self.cfg.metrics
        prompts = self.prompt_set(which)
        path = self.out / "corpora" / f"base_samples_{which}.json"
        fp = self._cache_fingerprint(prompts=data_fingerprint(prompts), max_new_tokens=m.kl_max_new_tokens,
                                     seed=m.sample_seed, temperature=1.0)
        cached = read_json(path)
        if cached is not None and not self._stale(f"corpora/base_samples_{which}.json", cached.get("fingerprint"), fp):
            return cached["responses"]
        own = base_model is None
        if own:
            base_model, tokenizer = self.load_base()
        start = time.perf_counter()
        responses = forgetting.sample_base_responses(base_model, tokenizer, prompts, max_new_tokens=m.kl_max_new_tokens,
                                                     seed=m.sample_seed, batch_size=m.batch_size, progress=self.progress)
        responses = [[int(t) for t in r] for r in responses]
        write_json_atomic(path, {"fingerprint": fp, "num_prompts": len(prompts), "seconds": time.perf_counter() - start,
                                 "responses": responses})
        if own:
            del base_model
        return responses

    # ---- metrics ---------------------------------------------------------------------------------------------------

    def measure(self, model, tokenizer, is_base: bool) -> dict:
        """KL(base || model) on the in-domain and general prompt sets and the held-out NLL (forward passes only)."""
        m = self.cfg.metrics
        out: dict[str, Any] = {}
        if not (m.kl or m.nll):
            return out
        from trl_onpolicy.eval import forgetting

        start = time.perf_counter()
        if m.kl:
            base_model = None if is_base else self.load_base()[0]
            for which in ("in_domain", "general"):
                responses = self.base_samples(which, model if is_base else base_model, tokenizer)
                if is_base:  # KL of a model to itself is 0 exactly; no forward pass needed
                    n = len(responses)
                    out[f"kl_{which}"] = {"mean": 0.0, "ci_low": 0.0, "ci_high": 0.0, "num_prompts": n}
                    continue
                if which not in self._base_hidden:
                    self._base_hidden[which] = forgetting.base_hidden_states(
                        base_model, tokenizer, self.prompt_set(which), responses, batch_size=m.batch_size,
                        progress=self.progress)
                r = forgetting.kl_to_base(base_model, model, tokenizer, self.prompt_set(which), responses,
                                          batch_size=m.batch_size, base_hidden=self._base_hidden[which],
                                          progress=self.progress)
                out[f"kl_{which}"] = _metric_record(r)
            del base_model
        if m.nll:
            out["heldout_nll"] = _metric_record(forgetting.heldout_nll(model, tokenizer, self.nll_rows(), batch_size=m.batch_size,
                                                                       progress=self.progress))
        out["metrics_seconds"] = time.perf_counter() - start
        return out

    # ---- training --------------------------------------------------------------------------------------------------

    def unit_dir(self, unit: Unit) -> Path:
        base = self.out / "methods" / unit.spec.label
        return base if unit.spec.name == "base" and unit.seed is None else base / unit.folder_name

    def result_path(self, unit: Unit) -> Path:
        return self.unit_dir(unit) / "result.json"

    def common_args(self, unit: Unit) -> dict:
        b = self.cfg.budget
        return dict(
            output_dir=str(self.unit_dir(unit) / "trainer"),
            max_steps=b.max_steps,
            per_device_train_batch_size=b.per_device_train_batch_size,
            gradient_accumulation_steps=b.gradient_accumulation_steps,
            learning_rate=unit.lr,
            lr_scheduler_type=b.lr_scheduler_type,
            warmup_steps=b.warmup_steps,
            weight_decay=b.weight_decay,
            max_grad_norm=b.max_grad_norm,
            gradient_checkpointing=b.gradient_checkpointing,
            seed=unit.seed,
            data_seed=unit.seed,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            dataloader_num_workers=0,
            disable_tqdm=not self.progress,
            **({"use_cpu": True, "bf16": False} if self.device == "cpu" else {}),
        )

    def trainer_config(self, unit: Unit):
        """The trainer configuration of a unit (built during validation too, so a bad ``args`` value fails before any
        training). ``sdft`` returns its argument mapping (its wrapper builds the config)."""
        name = unit.spec.name
        args = {**self.common_args(unit), **unit.spec.args}
        where = f"methods[{unit.spec.label}].args"
        try:
            if name in TOKEN_LOSS or name == "idft_online":
                from trl_onpolicy.trainer.idft_config import IDFTConfig

                args.setdefault("token_loss", TOKEN_LOSS.get(name, "idft"))
                if name == "idft_online":
                    args.setdefault("remove_unused_columns", False)
                return IDFTConfig(max_length=self.cfg.budget.max_length, **args)
            if name == "dpo":
                from trl import DPOConfig

                return DPOConfig(max_length=self.cfg.budget.max_length, **args)
            if name == "simpo":
                os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
                try:
                    from trl.experimental.cpo import CPOConfig
                except ImportError:
                    return None  # reported as unavailable when the unit runs
                args.setdefault("loss_type", "simpo")
                args.setdefault("cpo_alpha", 0.0)
                return CPOConfig(max_length=self.cfg.budget.max_length, **args)
            if name == "sdft":
                try:
                    from trl_onpolicy.trainer import sdft
                except ImportError:
                    return None  # reported as unavailable when the unit runs
                output_dir = args.pop("output_dir")
                args = {"max_completion_length": self.cfg.budget.max_length, **self.cfg.sdft, **args}
                sdft.sdft_config(output_dir, args)  # SDFTConfig checks the values now, before any training
                return args
        except TypeError as err:  # an unknown keyword
            raise ValueError(f"{where}: {err}") from None
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
        raise ValueError(name)  # pragma: no cover - MethodSpec validates names

    def train(self, unit: Unit, model, tokenizer) -> tuple[dict, Any]:
        """Train ``model`` with the unit's method; returns training facts (steps, tokens, seconds, logs) and the model."""
        name = unit.spec.name
        info: dict[str, Any] = {}
        config = self.trainer_config(unit)
        if name == "sdft":
            try:
                from trl_onpolicy.trainer import sdft
            except ImportError as err:
                raise MethodUnavailable(f"sdft needs trl_onpolicy.trainer.sdft, which is not available ({err}).") from err
            rows = self.train_rows()
            info.update(corpus="reference", num_train_samples=len(rows))
            info["train_phi"] = self.corpus_phi("reference", self.sft_dataset(), model, tokenizer)
            info["train_phi_note"] = "phi of the reference solutions, SDFT's privileged context (it trains on its own samples)"
            trainer = sdft.build_sdft_trainer(model, tokenizer, rows, config, self.unit_dir(unit) / "trainer")
        elif name in ("sft", "dft", "eaft", "idft", "sft_hinted", "idft_hinted"):
            from trl_onpolicy.trainer.idft_trainer import IDFTTrainer

            if name.endswith("_hinted"):
                dataset, summary = self.hinted_dataset(model, tokenizer)
                info["corpus"] = f"hinted_{summary['fallback']}"
                info["hinted_summary"] = {k: v for k, v in summary.items() if not isinstance(v, (dict, list))}
            else:
                dataset = self.sft_dataset()
                info["corpus"] = "reference"
            info["train_phi"] = self.corpus_phi(info["corpus"], dataset, model, tokenizer)
            trainer = IDFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
            info["num_train_samples"] = len(dataset)
        elif name == "idft_online":
            trainer, n = self._online_trainer(config, model, tokenizer)
            info["corpus"] = "online"
            info["num_train_samples"] = n
            info["train_phi"] = self.corpus_phi("reference", self.sft_dataset(), model, tokenizer)
            info["train_phi_note"] = "phi of the reference corpus the online re-alignment starts from"
        elif name in ("dpo", "simpo"):
            pairs, stats = self.preference_dataset(model, tokenizer)
            info["pairs"] = stats
            info["corpus"] = "pairs"
            info["num_train_samples"] = len(pairs)
            chosen = pairs.map(lambda r: {"completion": r["chosen"]}).select_columns(["prompt", "completion"])
            rejected = pairs.map(lambda r: {"completion": r["rejected"]}).select_columns(["prompt", "completion"])
            info["train_phi"] = self.corpus_phi("pairs_chosen", chosen, model, tokenizer)
            info["rejected_phi"] = self.corpus_phi("pairs_rejected", rejected, model, tokenizer)
            if name == "dpo":
                from trl import DPOTrainer

                ref_model = copy.deepcopy(model).eval()
                for p in ref_model.parameters():
                    p.requires_grad_(False)
                trainer = DPOTrainer(model=model, ref_model=ref_model, args=config, train_dataset=pairs, processing_class=tokenizer)
            else:
                try:
                    from trl.experimental.cpo import CPOTrainer
                except ImportError as err:
                    raise MethodUnavailable(f"SimPO needs trl.experimental.cpo (TRL >= 1.x): {err}") from err
                trainer = CPOTrainer(model=model, args=config, train_dataset=pairs, processing_class=tokenizer)
        else:  # pragma: no cover - MethodSpec validates names
            raise ValueError(name)

        counter = _token_counter_callback(trainer, self.cfg.budget.max_tokens)
        start = time.perf_counter()
        output = trainer.train()
        info["train_seconds"] = time.perf_counter() - start
        info["steps"] = trainer.state.global_step
        info["tokens_trained"] = counter["tokens"]
        info["train_loss"] = output.training_loss
        info["log_history"] = trainer.state.log_history
        trained = trainer.accelerator.unwrap_model(trainer.model)
        trained.eval()
        del trainer
        return info, trained

    def _online_trainer(self, config, model, tokenizer):
        try:
            importlib.import_module("trl_onpolicy.trainer.online")
        except ImportError as err:
            raise MethodUnavailable(f"idft_online needs trl_onpolicy.trainer.online, which is not available ({err}).") from err
        from trl_onpolicy.trainer.idft_trainer import OnlineIDFTTrainer as trainer_cls
        from datasets import Dataset

        rows = self.train_rows()
        dataset = Dataset.from_list([{k: r[k] for k in ("prompt", "completion", "question", "solution", "answer") if k in r} for r in rows])
        trainer = trainer_cls(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                              hinted_collator_kwargs=dict(self.cfg.online) or None)
        return trainer, len(dataset)

    # ---- one unit ------------------------------------------------------------------------------------------------

    def units(self) -> list[Unit]:
        """Every unit of the sweep, seed by seed (a sweep cut short has whole seeds of every method first); base
        first, once (per seed only when evaluation samples)."""
        c = self.cfg
        units: list[Unit] = []
        sampled_eval = c.eval_config.temperature > 0
        for spec in c.method_specs:
            if spec.name == "base":
                units += [Unit(spec, None, s) for s in c.seeds_of(spec)] if sampled_eval else [Unit(spec, None, None)]
        seeds = []
        for spec in c.method_specs:
            seeds += [s for s in c.seeds_of(spec) if s not in seeds]
        for seed in seeds:
            for spec in c.method_specs:
                if spec.name != "base" and seed in c.seeds_of(spec):
                    units += [Unit(spec, lr, seed) for lr in c.rates_of(spec)]
        # two entries of one label (e.g. a rate scan at one seed, then the best rate at every seed) may name a unit twice
        return list({u.key: u for u in units}.values())

    def run_unit(self, unit: Unit) -> dict:
        """Train (unless base), evaluate and measure one unit; always returns a result dict (failures included)."""
        spec = unit.spec
        result: dict[str, Any] = {"key": unit.key, "label": spec.label, "method": spec.name, "args": spec.args,
                                  "learning_rate": unit.lr, "seed": unit.seed, "status": "running"}
        start = time.perf_counter()
        try:
            with PeakMemory() as mem:
                model, tokenizer = self.load_base()
                torch.manual_seed(unit.seed if unit.seed is not None else self.cfg.budget.seed)
                if spec.name != "base":
                    info, model = self.train(unit, model, tokenizer)
                    result.update(info)
                else:
                    result.update(steps=0, tokens_trained=0, train_seconds=0.0, corpus=None)
                    result["train_phi"] = self.corpus_phi("reference", self.sft_dataset(), model, tokenizer)
                eval_start = time.perf_counter()
                eval_config = self.cfg.eval_config
                if unit.seed is not None and eval_config.temperature > 0:
                    eval_config = dataclasses.replace(eval_config, seed=unit.seed)
                result["eval"] = evaluate(model, tokenizer, self.cfg.eval_sets, eval_config, self.unit_dir(unit) / "eval")
                result["eval_seconds"] = time.perf_counter() - eval_start
                result["metrics"] = self.measure(model, tokenizer, is_base=spec.name == "base")
                del model
            result["status"] = "ok"
            result["peak_rss_mib"] = mem.peak_rss_mib
            result["peak_cuda_mib"] = mem.peak_cuda_mib
        except MethodUnavailable as err:
            result.update(status="unavailable", error=str(err))
        except Exception as err:  # a crash in one unit must not stop the others
            result.update(status="failed", error=f"{type(err).__name__}: {err}",
                          traceback=traceback.format_exc(limit=20)[-4000:])
        result["wall_seconds"] = time.perf_counter() - start
        result["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        gc.collect()  # once per unit: frees the trained model's reference cycles (each call costs ~1 s on a large heap)
        return result

    # ---- the whole run ---------------------------------------------------------------------------------------------

    def run(self) -> dict:
        if self.cfg.num_threads:
            # on a shared CPU one thread per process is often several times faster than oversubscribed threads
            torch.set_num_threads(int(self.cfg.num_threads))
        self.validate()  # raises before anything is trained or written
        self.out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.out / "config.json", self.config_dict())
        units = self.units()
        index, count = self.cfg.shard_index
        results: dict[str, dict] = {}
        for i, unit in enumerate(units, 1):
            tag = f"[compare] ({i}/{len(units)}) {unit.key}"
            if self.cfg.report_only or (i - 1) % count != index:
                continue  # another shard's unit (or a report-only run): reported below once it has finished
            with file_lock(self.claim_path(unit), wait=False) as held:
                if not held:
                    print(f"{tag}: another process is running it, skipping", flush=True)
                    continue
                results[unit.key], ran = self._run_claimed(unit, tag)
            if ran:
                self.report(self._with_others(units, results), plots=False)  # tables after every unit; plots at the end
        return self.report(self._with_others(units, results))

    def _with_others(self, units: list[Unit], results: dict) -> dict:
        """``results`` plus the units other processes have finished by now, in the sweep's order."""
        out = {}
        for unit in units:
            done = results.get(unit.key) or self.finished(unit)
            if done is not None:
                out[unit.key] = done
        return out

    def claim_path(self, unit: Unit) -> Path:
        """The lock file a process holds while it runs ``unit`` (outside the unit's folder, which a run may replace)."""
        folder = self.unit_dir(unit).relative_to(self.out / "methods")
        return self.out / ".claims" / f"{'_'.join(folder.parts)}.lock"

    def finished(self, unit: Unit) -> dict | None:
        """The stored result of ``unit`` when it finished (status ok) under this configuration, else None."""
        path = self.result_path(unit)
        previous = read_json(path) if path.is_file() else None
        if previous is not None and previous.get("status") == "ok" and not changed_keys(previous.get("fingerprint"), self.unit_fingerprint(unit)):
            return previous
        return None

    def _run_claimed(self, unit: Unit, tag: str) -> tuple[dict, bool]:
        """Run ``unit`` (held by this process) unless its stored result is current (finished, or failed with
        ``rerun_failed: false``); returns the result and whether it ran now."""
        path = self.result_path(unit)
        fp = self.unit_fingerprint(unit)
        settings = self.unit_settings(unit)
        previous = read_json(path) if path.is_file() else None  # read under the claim: another process may have just finished it
        if previous is not None:
            changed = changed_keys(previous.get("fingerprint"), fp)
            if previous.get("fingerprint") is None:
                print(f"{tag}: the stored result has no fingerprint (an older compare wrote it); recomputing it", flush=True)
            elif changed:
                detail = _changed_settings(previous.get("settings") or {}, settings) if "settings" in changed else []
                what = ", ".join(changed) + (f" ({', '.join(detail)})" if detail else "")
                print(f"{tag}: the stored result was produced from a different {what}; recomputing it", flush=True)
            elif previous.get("status") == "ok" or not self.cfg.rerun_failed:
                print(f"{tag}: already done ({previous.get('status')}), skipping", flush=True)
                return previous, False
        print(f"{tag}: running", flush=True)
        result = self.run_unit(unit)
        result["fingerprint"] = fp
        result["settings"] = settings
        write_json_atomic(path, result)
        msg = result.get("error", "")
        print(f"{tag}: {result['status']} in {result['wall_seconds']:.0f} s {msg}".rstrip(), flush=True)
        return result, True

    def config_dict(self) -> dict:
        c = self.cfg
        return {
            "model_name_or_path": c.model_name_or_path, "output_dir": c.output_dir, "data": asdict(c.data),
            "budget": asdict(c.budget), "sweep": asdict(c.sweep), "metrics": asdict(c.metrics),
            "eval": {"sets": [asdict(s) for s in c.eval_sets], **asdict(c.eval_config)},
            "methods": [asdict(m) for m in c.method_specs], "pairs": c.pairs, "hinted": c.hinted, "online": c.online,
            "sdft": c.sdft, "phi": c.phi, "dtype": c.dtype, "fingerprint": self._fp,
        }

    def report(self, results: dict, plots: bool = True) -> dict:
        from trl_onpolicy.compare.report import write_report

        return write_report(results, self.cfg, self.out, self.config_dict(), plots=plots)


def _text_of(content) -> str:
    """The text of a completion: a string, or the contents of chat messages."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content.strip()
    if isinstance(content, list):
        return "".join(str(m.get("content") or "") if isinstance(m, dict) else str(m) for m in content).strip()
    return str(content).strip()


def _metric_record(r: dict) -> dict:
    """A `trl_onpolicy.eval.forgetting` result as stored in a unit: ``mean`` (its token-weighted headline value, ``kl`` or
    ``nll``), the interval, counts, and the per-prompt values (None for a prompt without tokens)."""
    out = {k: (float(v) if isinstance(v, float) else v) for k, v in r.items()
           if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
    out["mean"] = float(r["mean"] if "mean" in r else r["kl"] if "kl" in r else r["nll"])
    if "per_prompt" in r:
        out["per_prompt"] = [None if x is None else float(x) for x in r["per_prompt"]]
    return out


def _changed_settings(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted names of the settings that differ between two unit settings mappings."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _changed_settings(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


# ----------------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------------


def _parse_overrides(rest: list[str]) -> dict:
    import yaml

    overrides = {}
    i = 0
    while i < len(rest):
        key = rest[i]
        if not key.startswith("--"):
            raise ValueError(f"Unexpected argument {key!r}; overrides look like `--output_dir DIR`.")
        key = key[2:]
        if "=" in key:
            key, value = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(rest):
                raise ValueError(f"--{key} needs a value.")
            value = rest[i + 1]
            i += 2
        overrides[key] = yaml.safe_load(value)
    return overrides


def main(argv: list[str] | None = None) -> int:
    """Run a comparison; exit status 0 when every unit finished, 1 when any failed or was unavailable (bad input
    raises ValueError/FileNotFoundError before any work: `trl_onpolicy.cli.commands` turns that into exit status 2)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or "--config" not in argv:
        print(__doc__)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    i = argv.index("--config")
    if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
        raise ValueError("--config needs the path of a compare recipe (YAML).")
    path = argv[i + 1]
    rest = argv[:i] + argv[i + 2 :]
    config = load_config_file(path, _parse_overrides(rest))
    comparison = Comparison(config)
    payload = comparison.run()
    print((Path(config.output_dir) / "results.md").read_text())
    failed = [key for key, r in payload["units"].items() if r.get("status") != "ok"]
    if config.report_only:
        missing = len(comparison.units()) - len(payload["units"])
        if missing:
            print(f"[compare] report only: {missing} unit(s) have not finished under this configuration; exit status 1",
                  file=sys.stderr)
        return 1 if missing or failed else 0
    if failed:
        print(f"[compare] {len(failed)} unit(s) did not finish: {failed} (see results.md); exit status 1", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
