"""The compare recipe: its blocks as documented dataclasses, the rules their numbers must follow, and `parse_config`,
which checks a whole recipe (a YAML mapping) before anything is loaded or written. Every error names the recipe key
(``budget.max_steps``, ``methods[dpo].args.beta``) and what it accepts.

The blocks: ``data`` (`DataSpec`), ``budget`` (`Budget`), ``sweep`` (`SweepSpec`), ``metrics`` (`MetricsSpec`),
``methods`` (`MethodSpec` entries), ``eval`` (`trl_onpolicy.eval.evaluation.EvalSet` / `EvalConfig`), and the
top-level keys of `CompareConfig`. The command documents the recipe as a whole (`trl_onpolicy.compare.cli`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from trl_onpolicy.compare.methods import METHODS
from trl_onpolicy.eval.evaluation import EvalConfig, EvalSet
from trl_onpolicy.utils.validation import (
    COUNT,
    NON_NEGATIVE,
    OPTIONAL_COUNT,
    POSITIVE,
    PROBABILITY_OPEN_LOW,
    Range,
    check_fields,
    check_value,
    invalid,
)

# keys that belong to the shared budget or the sweep: a method's args may not change them
BUDGET_KEYS = ("max_steps", "per_device_train_batch_size", "gradient_accumulation_steps", "seed", "data_seed", "max_length")

SEED = Range(lo=0, integer=True)
LEARNING_RATE = Range(lo=0, lo_open=True, hi=1)
BUDGET_RULES = {
    "max_steps": COUNT, "max_tokens": OPTIONAL_COUNT, "per_device_train_batch_size": COUNT,
    "gradient_accumulation_steps": COUNT, "max_length": COUNT, "learning_rate": LEARNING_RATE,
    "warmup_steps": Range(lo=0, integer=True), "weight_decay": NON_NEGATIVE, "max_grad_norm": NON_NEGATIVE, "seed": SEED,
    "warmup_ratio": Range(lo=0, hi=1, hi_open=True, optional=True), "adam_beta2": Range(lo=0, hi=1, hi_open=True, optional=True),
}
EVAL_RULES = {"num_samples": COUNT, "temperature": NON_NEGATIVE, "top_p": PROBABILITY_OPEN_LOW, "max_new_tokens": COUNT,
              "batch_size": COUNT, "seed": SEED, "check_workers": COUNT}
DATA_RULES = {"n": OPTIONAL_COUNT, "seed": SEED, "max_solution_chars": OPTIONAL_COUNT, "dev_n": OPTIONAL_COUNT}
# numeric trainer arguments a method's `args` commonly set (the trainer config then checks the rest)
ARG_RULES = {"learning_rate": LEARNING_RATE, "weight_decay": NON_NEGATIVE, "max_grad_norm": NON_NEGATIVE,
             "beta": POSITIVE, "simpo_gamma": Range(), "cpo_alpha": NON_NEGATIVE, "temperature": POSITIVE,
             "idft_alpha": Range(), "eaft_top_k": COUNT, "warmup_ratio": Range(lo=0, hi=1)}



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
        prompt_template: format string with ``{question}`` giving the user turn of every training prompt; in-domain
            and out-of-domain evaluation sets that give no ``prompt_template`` of their own, the in-domain KL prompts
            and the held-out NLL rows get it too (retention sets never do). E.g. ``"{question}\\n\\nSolve the problem
            step by step, then give the final answer on the last line as '#### <answer>'."``
        dev_n: size of the DEV split: the next ``dev_n`` problems of the training generator after the ``n`` training
            ones (distinct from them, and from every test-split set by construction), evaluated on every unit. With
            it, each method's best learning rate is chosen on DEV accuracy, not on the test sets.
    """

    task: str = field(default="chain_sum", metadata={"help": "reasoning-gym task of trl_onpolicy.data.datasets.TASKS."})
    n: int | None = field(default=64, metadata={"help": "Number of training problems."})
    seed: int = field(default=0, metadata={"help": "Generator seed of the training problems."})
    task_kwargs: dict = field(default_factory=dict, metadata={"help": "reasoning-gym settings of the task."})
    answer_format: str = field(default="gsm", metadata={"help": "'gsm' (#### N) or 'boxed'."})
    max_solution_chars: int | None = field(default=None, metadata={"help": "Skip longer worked solutions."})
    path: str | None = field(default=None, metadata={"help": "Local prompt/completion/answer data instead of a task."})
    prompt_template: str = field(default="{question}", metadata={"help": "User turn of every prompt, with {question}."})
    dev_n: int | None = field(default=None, metadata={"help": "Held-out DEV problems for choosing each method's rate."})


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
        warmup_ratio: linear warm-up as a share of ``max_steps`` (instead of ``warmup_steps``); None = off.
        adam_beta2: AdamW's beta2; None = the trainer's default (0.999).
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
    warmup_ratio: float | None = field(default=None, metadata={"help": "Warm-up as a share of max_steps (None = off)."})
    adam_beta2: float | None = field(default=None, metadata={"help": "AdamW beta2 (None = the trainer's 0.999)."})


DEV_SET = "dev"  # the name of the DEV split (data.dev_n) in a unit's results and eval folder

# settings added after the first published study: left out of fingerprints and config.json while at these defaults,
# so the units of a recipe that does not use them keep their fingerprints
NEW_DEFAULTS = {"data": {"prompt_template": "{question}", "dev_n": None},
                "budget": {"warmup_ratio": None, "adam_beta2": None}}


def without_new_defaults(block: str, values: dict) -> dict:
    """``values`` (a block as a mapping) without the `NEW_DEFAULTS` settings of ``block`` that sit at their default."""
    defaults = NEW_DEFAULTS.get(block, {})
    return {k: v for k, v in values.items() if not (k in defaults and v == defaults[k])}


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
    """A whole compare recipe (built by `parse_config`; the command's help describes each block).

    Args:
        model_name_or_path: the starting model of every method (a folder, Hub id or ``embedded:<name>``).
        output_dir: where units, cached corpora and the report go.
        methods: method names or `MethodSpec` mappings (parsed into ``method_specs``).
        data / budget / sweep / metrics: `DataSpec`, `Budget`, `SweepSpec`, `MetricsSpec`.
        eval: generation settings (`EvalConfig` fields) and ``sets`` (`EvalSet` mappings); parsed into
            ``eval_config`` and ``eval_sets``.
        pairs / hinted / online / sdft / phi: settings of the DPO/SimPO pairs, the Hinted-Decoding corpus, online
            IDFT, SDFT and the DDT phi of each training corpus.
        dtype: precision of the base model as evaluated and as the corpora are built. Training always keeps float32
            master weights; with ``bfloat16``/``float16`` the trainer runs under that autocast (``bf16``/``fp16``).
        rerun_failed: retry failed units on the next run.
        report_only: run nothing; write the report from the stored units.
        dry_run: parse the recipe, print its units and their estimated cost (`units.estimate_seconds`), run nothing.
        title: report title.
        num_threads: torch CPU threads.
        shard: ``"auto"`` or ``"i/n"`` (see `shard_index`).
        contrasts: ``"a vs b"`` pairs of method labels for the report.
    """

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
    dry_run: bool = False

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
            "contrasts", "dry_run")


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


def _check_study_settings(cfg: CompareConfig) -> None:
    """The prompt template, the DEV split and the warm-up settings (one-line errors naming the key)."""
    d, b = cfg.data, cfg.budget
    if not isinstance(d.prompt_template, str):
        raise invalid("data", "prompt_template", d.prompt_template, "expected a string with {question}")
    try:
        ok = d.prompt_template.format(question="") is not None and "{question}" in d.prompt_template
    except (KeyError, IndexError, ValueError):
        ok = False
    if not ok:
        raise invalid("data", "prompt_template", d.prompt_template,
                      "expected a format string whose only field is {question} (write literal braces as {{ }})")
    if d.path and d.prompt_template != "{question}":
        raise invalid("data", "prompt_template", d.prompt_template,
                      "applies to task-generated data; with data.path write the prompts into the file")
    if d.dev_n and d.path and not d.n:
        raise invalid("data", "dev_n", d.dev_n, "with data.path set data.n too: the DEV rows are the file's rows after the first n")
    if b.warmup_ratio is not None and b.warmup_steps:
        raise invalid("budget", "warmup_ratio", b.warmup_ratio, "give warmup_steps or warmup_ratio, not both")


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
        dry_run=bool(raw.get("dry_run", False)),
        title=raw.get("title"),
        num_threads=raw.get("num_threads"),
        shard=None if raw.get("shard") is None else str(raw["shard"]),
    )
    cfg.shard_index  # noqa: B018 - checks the value
    check_fields(cfg.data, DATA_RULES, owner="data")
    _check_study_settings(cfg)
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
    template = cfg.data.prompt_template
    if template != "{question}":  # in-domain and OOD sets without a template of their own ask the training question
        sets = [{**s, "prompt_template": template} if isinstance(s, dict) and "prompt_template" not in s
                and s.get("role", "in_domain") in ("in_domain", "ood") and s.get("task") != "facts" else s for s in sets]
    cfg.eval_sets = [EvalSet.from_spec(s) for s in sets]
    names = [s.name for s in cfg.eval_sets]
    if len(set(names)) != len(names):
        raise ValueError(f"eval.sets names must be unique; got {names}.")
    if cfg.data.dev_n and DEV_SET in names:
        raise invalid("eval.sets", "name", DEV_SET, f"{DEV_SET!r} is the DEV split of data.dev_n; rename this set")
    cfg.eval_config = _strict(EvalConfig, eval_raw, "eval")
    check_fields(cfg.eval_config, EVAL_RULES, owner="eval")
    if cfg.eval_config.backend != "hf":
        # vLLM loads weights from a folder: every unit would be scored as the base model it names, not as trained
        raise invalid("eval", "backend", cfg.eval_config.backend,
                      "expected 'hf': compare evaluates each trained model in memory and vLLM would load the base model's folder "
                      "instead (every unit scored as the base model); use backend: hf")
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


