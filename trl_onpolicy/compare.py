"""Train several methods on the same data and budget, evaluate each, and report them side by side.

``trl-onpolicy compare --config recipes/compare/<recipe>.yaml`` (flags after the config override top-level keys:
``--output_dir DIR``, ``--methods base,sft,idft``). One YAML names:

- ``model_name_or_path``: the starting model of every method (a folder, Hub name, or ``embedded:smollm2-135m-instruct``);
- ``data``: the SFT corpus (``task`` of `trl_onpolicy.data.math_word_problems`, ``n``, ``seed``, ``task_kwargs``; or
  ``path`` to a local file/folder with prompt, completion and answer columns);
- ``eval``: the evaluation sets (`trl_onpolicy.evaluation.EvalSet` mappings: in-domain, out-of-domain, retention) and
  the generation settings (`trl_onpolicy.evaluation.EvalConfig` fields);
- ``methods``: any of `METHODS`, as names or mappings ``{name, label, args}`` (``args`` go to the method's trainer
  config, e.g. ``{learning_rate: 5e-7, beta: 0.1}``; ``label`` tells two runs of one method apart);
- ``budget``: what every method shares: the same training prompts, ``max_steps`` optimizer steps (and optionally a
  ``max_tokens`` cap on non-padding tokens), ``per_device_train_batch_size``, ``gradient_accumulation_steps``,
  ``max_length``, ``learning_rate`` (a method's ``args`` may change its own rate), and ``seed``;
- ``num_threads``: torch CPU threads (on a shared CPU, 1 can be many times faster than the default);
- ``pairs`` (DPO/SimPO, `trl_onpolicy.preferences.PairConfig` fields), ``hinted`` (`trl_onpolicy.realign.RealignConfig`
  fields for the Hinted-Decoding corpus), ``online`` (`trl_onpolicy.hinted_online.HintedDataCollator` keyword arguments: decoding settings of online IDFT).

Every method starts from the same base weights. ``base`` is evaluated untrained; ``sft``/``dft``/``eaft``/``idft`` train
with `IDFTTrainer` (token_loss nll/dft/eaft/idft) on the reference solutions; ``sft_hinted``/``idft_hinted`` train on the
corpus re-aligned to the base model with Hinted Decoding (built once, cached); ``idft_online`` re-aligns every batch
with the current weights; ``dpo`` (TRL's `DPOTrainer`, reference model = a frozen copy of the base) and ``simpo``
(TRL's `CPOTrainer` with ``loss_type="simpo", cpo_alpha=0``) train on preference pairs (chosen = reference, rejected =
the base model's own wrong sample; built once, cached). DPO/SimPO therefore see the subset of prompts that got a pair.

Output (``output_dir``): ``methods/<label>/result.json`` (one per method, written atomically), ``methods/<label>/eval/``
(per-sample jsonl), ``corpora/`` (pairs, re-aligned corpus, DDT phi of each training corpus under the base model),
``results.json``, ``results.md`` and ``compare_accuracy.png``.

Resuming: run the same command again. A method whose result.json says ``"status": "ok"`` is not run again; a failed
one is retried (``rerun_failed: false`` keeps the failure). A method that raises is recorded as failed with its error
and the others go on; a method whose module is not available records that as its error.
"""

from __future__ import annotations

import copy
import gc
import json
import os
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from .evaluation import EvalConfig, EvalSet, evaluate

METHODS = ("base", "sft", "dft", "eaft", "idft", "sft_hinted", "idft_hinted", "idft_online", "dpo", "simpo")
TOKEN_LOSS = {"sft": "nll", "dft": "dft", "eaft": "eaft", "idft": "idft", "sft_hinted": "nll", "idft_hinted": "idft"}
# keys that belong to the shared budget: a method's args may not change them
BUDGET_KEYS = ("max_steps", "per_device_train_batch_size", "gradient_accumulation_steps", "seed", "data_seed", "max_length")


class MethodUnavailable(RuntimeError):
    """A method whose implementation (module or optional package) is not available in this installation."""


# ----------------------------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class DataSpec:
    """The training corpus.

    Args:
        task: a `trl_onpolicy.data.TASKS` task (worked solutions generated offline), used when ``path`` is unset.
        n: number of training problems (the same prompts for every method).
        seed: generator seed.
        task_kwargs: reasoning-gym settings of the task.
        answer_format: ``"gsm"`` (``#### N``) or ``"boxed"``.
        max_solution_chars: skip problems whose worked solution is longer.
        path: a local file or saved dataset folder with ``prompt``, ``completion`` and ``answer`` columns instead.
    """

    task: str = "chain_sum"
    n: int = 64
    seed: int = 0
    task_kwargs: dict = field(default_factory=dict)
    answer_format: str = "gsm"
    max_solution_chars: int | None = None
    path: str | None = None


@dataclass
class Budget:
    """What every method shares.

    Args:
        max_steps: optimizer steps per method.
        max_tokens: optional cap on trained (non-padding) tokens; a method stops at whichever limit comes first.
        per_device_train_batch_size / gradient_accumulation_steps: samples per step (DPO/SimPO: pairs per step).
        max_length: truncation length of training sequences.
        learning_rate / lr_scheduler_type / warmup_steps / weight_decay / max_grad_norm: optimizer settings (a
            method's ``args`` may override the learning rate, e.g. DPO typically uses a smaller one).
        gradient_checkpointing: off by default (small models on CPU train faster without it).
        seed: seed of training, sampling and evaluation.
    """

    max_steps: int = 8
    max_tokens: int | None = None
    per_device_train_batch_size: int = 2
    gradient_accumulation_steps: int = 1
    max_length: int = 256
    learning_rate: float = 1e-5
    lr_scheduler_type: str = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = False
    seed: int = 0


@dataclass
class MethodSpec:
    name: str
    label: str | None = None
    args: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.name not in METHODS:
            raise ValueError(f"Unknown method {self.name!r}; choose from {list(METHODS)}.")
        self.label = self.label or self.name
        bad = sorted(k for k in self.args if k in BUDGET_KEYS)
        if bad:
            raise ValueError(
                f"Method {self.label!r} sets {bad} in its args: these belong to the shared `budget` (every method uses "
                "the same), so set them there."
            )


@dataclass
class CompareConfig:
    model_name_or_path: str
    output_dir: str
    methods: list = field(default_factory=lambda: ["base", "sft", "idft"])
    data: DataSpec = field(default_factory=DataSpec)
    budget: Budget = field(default_factory=Budget)
    eval: dict = field(default_factory=dict)
    pairs: dict = field(default_factory=dict)
    hinted: dict = field(default_factory=dict)
    online: dict = field(default_factory=dict)
    phi: dict = field(default_factory=lambda: {"enabled": True, "max_samples": 128, "batch_size": 8})
    dtype: str = "float32"
    rerun_failed: bool = True
    title: str | None = None
    num_threads: int | None = None

    # parsed forms
    eval_sets: list = field(default_factory=list, repr=False)
    eval_config: EvalConfig = field(default_factory=EvalConfig, repr=False)
    method_specs: list = field(default_factory=list, repr=False)


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
    return cls(**values)


TOP_KEYS = ("model_name_or_path", "output_dir", "methods", "data", "budget", "eval", "pairs", "hinted", "online", "phi",
            "dtype", "rerun_failed", "title", "num_threads", "env")


def parse_config(raw: dict) -> CompareConfig:
    """Validate a compare recipe (a mapping, e.g. loaded from YAML); errors name the offending key."""
    if not isinstance(raw, dict):
        raise ValueError("A compare recipe must be a YAML mapping.")
    unknown = sorted(set(raw) - set(TOP_KEYS))
    if unknown:
        raise ValueError(f"Unknown top-level key(s) {unknown} in the compare recipe; known keys: {list(TOP_KEYS)}.")
    for key in ("model_name_or_path", "output_dir"):
        if not raw.get(key):
            raise ValueError(f"The compare recipe needs `{key}`.")
    for key, value in (raw.get("env") or {}).items():
        os.environ[str(key)] = str(value)
    eval_raw = dict(raw.get("eval") or {})
    sets = eval_raw.pop("sets", None)
    if not sets:
        raise ValueError("The compare recipe needs `eval.sets`: a list of evaluation sets (in-domain, ood, retention).")
    eval_raw.setdefault("seed", (raw.get("budget") or {}).get("seed", 0))
    cfg = CompareConfig(
        model_name_or_path=raw["model_name_or_path"],
        output_dir=raw["output_dir"],
        methods=raw.get("methods") or ["base"],
        data=_strict(DataSpec, raw.get("data"), "data"),
        budget=_strict(Budget, raw.get("budget"), "budget"),
        eval=raw.get("eval") or {},
        pairs=dict(raw.get("pairs") or {}),
        hinted=dict(raw.get("hinted") or {}),
        online=dict(raw.get("online") or {}),
        phi={"enabled": True, "max_samples": 128, "batch_size": 8, **(raw.get("phi") or {})},
        dtype=raw.get("dtype", "float32"),
        rerun_failed=bool(raw.get("rerun_failed", True)),
        title=raw.get("title"),
        num_threads=raw.get("num_threads"),
    )
    cfg.eval_sets = [EvalSet.from_spec(s) for s in sets]
    names = [s.name for s in cfg.eval_sets]
    if len(set(names)) != len(names):
        raise ValueError(f"eval.sets names must be unique; got {names}.")
    cfg.eval_config = _strict(EvalConfig, eval_raw, "eval")
    specs = []
    methods = cfg.methods.split(",") if isinstance(cfg.methods, str) else cfg.methods
    for m in methods:
        if isinstance(m, str):
            specs.append(MethodSpec(name=m.strip()))
        elif isinstance(m, dict):
            specs.append(_strict(MethodSpec, m, f"methods[{m.get('name', '?')}]"))
        else:
            raise ValueError(f"A method must be a name or a mapping {{name, label, args}}; got {m!r}.")
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"Method labels must be unique (give repeated methods a `label`); got {labels}.")
    cfg.method_specs = specs
    if cfg.pairs:
        from .preferences import PairConfig

        _strict(PairConfig, cfg.pairs, "pairs")
    return cfg


def load_config_file(path: str | Path, overrides: dict | None = None) -> CompareConfig:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Compare recipe {path} does not exist.")
    raw = yaml.safe_load(path.read_text()) or {}
    raw.update(overrides or {})
    return parse_config(raw)


# ----------------------------------------------------------------------------------------------------------------------
# Small utilities
# ----------------------------------------------------------------------------------------------------------------------


def write_json_atomic(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


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


def _token_counter_callback(trainer, max_tokens: int | None):
    """Count non-padding tokens of every training batch (its attention masks, else ``input_ids``) by
    wrapping ``trainer.training_step``; stop training once ``max_tokens`` is reached."""
    from transformers import TrainerCallback

    counter = {"tokens": 0}
    original = trainer.training_step

    def training_step(model, inputs, *args, **kwargs):
        # SFT/DPO batches carry one `attention_mask` over whole sequences; CPO/SimPO batches carry
        # chosen_/rejected_attention_mask (prompt included) beside prompt_attention_mask, which would count prompts twice
        if torch.is_tensor(inputs.get("attention_mask")):
            masks = [inputs["attention_mask"]]
        else:
            masks = [v for k, v in inputs.items()
                     if k.endswith("attention_mask") and not k.startswith("prompt_") and torch.is_tensor(v)]
        if masks:
            counter["tokens"] += int(sum(int(m.sum()) for m in masks))
        elif "input_ids" in inputs:
            counter["tokens"] += int(inputs["input_ids"].numel())
        return original(model, inputs, *args, **kwargs)

    trainer.training_step = training_step

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
    """One compare run: shared data, cached corpora, and one `run_method` per method."""

    def __init__(self, config: CompareConfig, progress: bool = True):
        self.cfg = config
        self.out = Path(config.output_dir)
        self.progress = progress
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self._model_path = None
        self._train_rows = None

    # ---- model and data ------------------------------------------------------------------------------------------

    @property
    def model_path(self) -> str:
        if self._model_path is None:
            path = self.cfg.model_name_or_path
            if isinstance(path, str) and path.startswith("embedded:"):
                from .models import resolve_model_path

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
        return model, tokenizer

    def train_rows(self) -> list[dict]:
        """The training problems (identical for every method)."""
        if self._train_rows is None:
            d = self.cfg.data
            if d.path:
                from .data import load_sft_dataset

                rows = list(load_sft_dataset(d.path))
                rows = rows[: d.n] if d.n else rows
            else:
                from .data import math_word_problems

                rows = list(
                    math_word_problems(
                        d.n, seed=d.seed, task=d.task, split="train", answer_format=d.answer_format,
                        max_solution_chars=d.max_solution_chars, **d.task_kwargs,
                    )
                )
            for col in ("prompt", "completion"):
                if rows and col not in rows[0]:
                    raise ValueError(f"The training data needs a `{col}` column (TRL prompt-completion); it has {sorted(rows[0])}.")
            self._train_rows = rows
        return self._train_rows

    def sft_dataset(self, rows=None):
        from datasets import Dataset

        rows = self.train_rows() if rows is None else rows
        return Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows])

    # ---- cached corpora --------------------------------------------------------------------------------------------

    def preference_dataset(self, model, tokenizer):
        """Pairs from the base model's samples, built once into corpora/pairs (reused by dpo and simpo)."""
        from datasets import load_from_disk

        from .preferences import PairConfig, make_preference_dataset

        folder = self.out / "corpora" / "pairs"
        if (folder / "pairs_stats.json").is_file():
            return load_from_disk(str(folder)), json.loads((folder / "pairs_stats.json").read_text())
        pc = {"seed": self.cfg.budget.seed, "batch_size": self.cfg.eval_config.batch_size,
              "max_new_tokens": self.cfg.eval_config.max_new_tokens, **self.cfg.pairs}
        config = PairConfig(**pc)
        tmp = folder.with_name(f".pairs.tmp-{os.getpid()}")
        dataset, stats = make_preference_dataset(model, tokenizer, self.train_rows(), config, tmp)
        if folder.exists():
            import shutil

            shutil.rmtree(folder)
        os.replace(tmp, folder)
        return load_from_disk(str(folder)), stats

    def hinted_dataset(self, model, tokenizer):
        """The training corpus re-aligned to the base model with Hinted Decoding (trl_onpolicy.realign), cached.

        ``hinted.fallback`` decides what happens to prompts whose re-aligned response the realign filters drop
        (unfinished, wrong answer, low phi): ``"reference"`` (default) trains on the reference response for those
        prompts, so every method keeps the same prompts; ``"drop"`` trains on the kept responses only."""
        try:
            from .realign import RealignConfig, realign_dataset
        except ImportError as err:
            raise MethodUnavailable(f"Hinted-Decoding methods need trl_onpolicy.realign, which is not available ({err}).") from err
        from datasets import Dataset

        settings = dict(self.cfg.hinted)
        fallback = settings.pop("fallback", "reference")
        if fallback not in ("reference", "drop"):
            raise ValueError(f"hinted.fallback={fallback!r}; use 'reference' or 'drop'.")
        folder = self.out / "corpora" / "hinted"
        summary_path = folder / "summary.json"
        rows = self.train_rows()
        if not summary_path.is_file():
            settings = {"model_name_or_path": str(self.model_path), "dataset_name": "compare:train", "output_dir": str(folder),
                        "seed": self.cfg.budget.seed, **settings}
            config = RealignConfig(**settings)
            data = Dataset.from_list([{k: r[k] for k in ("prompt", "question", "solution", "answer") if k in r} for r in rows])
            realign_dataset(model, tokenizer, data, config, progress=self.progress)
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

    def corpus_phi(self, name: str, dataset, model, tokenizer) -> dict | None:
        """Mean phi (DDT) of a training corpus under the base model, cached in corpora/phi_<name>.json."""
        if not self.cfg.phi.get("enabled", True):
            return None
        path = self.out / "corpora" / f"phi_{name}.json"
        if path.is_file():
            return json.loads(path.read_text())
        n = min(len(dataset), int(self.cfg.phi.get("max_samples") or len(dataset)))
        subset = dataset.select(range(n)) if hasattr(dataset, "select") else dataset[:n]
        from .ddt import score_dataset

        result = score_dataset(model, tokenizer, subset, max_length=self.cfg.budget.max_length,
                               batch_size=int(self.cfg.phi.get("batch_size", 8)), progress=self.progress,
                               desc=f"DDT phi ({name})")
        s = result.summary
        info = {"mean_phi": s.get("mean_phi"), "std_phi": s.get("std_phi"), "num_tokens": s.get("num_tokens"),
                "num_samples": s.get("num_samples"), "source": "trl_onpolicy.ddt.score_dataset"}
        write_json_atomic(path, info)
        return info

    # ---- training --------------------------------------------------------------------------------------------------

    def common_args(self, spec: MethodSpec) -> dict:
        b = self.cfg.budget
        return dict(
            output_dir=str(self.out / "methods" / spec.label / "trainer"),
            max_steps=b.max_steps,
            per_device_train_batch_size=b.per_device_train_batch_size,
            gradient_accumulation_steps=b.gradient_accumulation_steps,
            learning_rate=b.learning_rate,
            lr_scheduler_type=b.lr_scheduler_type,
            warmup_steps=b.warmup_steps,
            weight_decay=b.weight_decay,
            max_grad_norm=b.max_grad_norm,
            gradient_checkpointing=b.gradient_checkpointing,
            seed=b.seed,
            data_seed=b.seed,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            dataloader_num_workers=0,
            disable_tqdm=not self.progress,
            **({"use_cpu": True, "bf16": False} if self.device == "cpu" else {}),
        )

    def train(self, spec: MethodSpec, model, tokenizer) -> dict:
        """Train ``model`` in place with ``spec``'s method; returns training facts (steps, tokens, seconds, logs)."""
        name = spec.name
        args = {**self.common_args(spec), **spec.args}
        info: dict[str, Any] = {}
        if name in ("sft", "dft", "eaft", "idft", "sft_hinted", "idft_hinted"):
            from .idft_config import IDFTConfig
            from .idft_trainer import IDFTTrainer

            if name.endswith("_hinted"):
                dataset, summary = self.hinted_dataset(model, tokenizer)
                info["corpus"] = f"hinted_{summary['fallback']}"
                info["hinted_summary"] = {k: v for k, v in summary.items() if not isinstance(v, (dict, list))}
            else:
                dataset = self.sft_dataset()
                info["corpus"] = "reference"
            info["train_phi"] = self.corpus_phi(info["corpus"], dataset, model, tokenizer)
            args.setdefault("token_loss", TOKEN_LOSS[name])
            config = IDFTConfig(max_length=self.cfg.budget.max_length, **args)
            trainer = IDFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
            info["num_train_samples"] = len(dataset)
        elif name == "idft_online":
            trainer, n = self._online_trainer(spec, model, tokenizer, args)
            info["corpus"] = "online"
            info["num_train_samples"] = n
            ref = self.sft_dataset()
            info["train_phi"] = self.corpus_phi("reference", ref, model, tokenizer)
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
                from trl import DPOConfig, DPOTrainer

                config = DPOConfig(max_length=self.cfg.budget.max_length, **args)
                ref_model = copy.deepcopy(model).eval()
                for p in ref_model.parameters():
                    p.requires_grad_(False)
                trainer = DPOTrainer(model=model, ref_model=ref_model, args=config, train_dataset=pairs, processing_class=tokenizer)
            else:
                os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
                try:
                    from trl.experimental.cpo import CPOConfig, CPOTrainer
                except ImportError as err:
                    raise MethodUnavailable(f"SimPO needs trl.experimental.cpo (TRL >= 1.x): {err}") from err
                args.setdefault("loss_type", "simpo")
                args.setdefault("cpo_alpha", 0.0)
                config = CPOConfig(max_length=self.cfg.budget.max_length, **args)
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
        trained = trainer.model
        trained.eval()
        del trainer
        return info, trained

    def _online_trainer(self, spec, model, tokenizer, args):
        try:
            from . import hinted_online
        except ImportError as err:
            raise MethodUnavailable(f"idft_online needs trl_onpolicy.hinted_online, which is not available ({err}).") from err
        trainer_cls = getattr(hinted_online, "OnlineIDFTTrainer", None)
        if trainer_cls is None:
            raise MethodUnavailable("idft_online needs trl_onpolicy.hinted_online.OnlineIDFTTrainer, which is not available.")
        from datasets import Dataset

        from .idft_config import IDFTConfig

        rows = self.train_rows()
        dataset = Dataset.from_list([{k: r[k] for k in ("prompt", "completion", "question", "solution", "answer") if k in r} for r in rows])
        args.setdefault("token_loss", "idft")
        args.setdefault("remove_unused_columns", False)
        config = IDFTConfig(max_length=self.cfg.budget.max_length, **args)
        trainer = trainer_cls(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                              hinted_collator_kwargs=dict(self.cfg.online) or None)
        return trainer, len(dataset)

    # ---- one method ------------------------------------------------------------------------------------------------

    def result_path(self, spec: MethodSpec) -> Path:
        return self.out / "methods" / spec.label / "result.json"

    def run_method(self, spec: MethodSpec) -> dict:
        """Train (unless base) and evaluate one method; always returns a result dict (failures included)."""
        result: dict[str, Any] = {"label": spec.label, "method": spec.name, "args": spec.args, "status": "running"}
        start = time.perf_counter()
        try:
            with PeakMemory() as mem:
                model, tokenizer = self.load_base()
                torch.manual_seed(self.cfg.budget.seed)
                if spec.name != "base":
                    info, model = self.train(spec, model, tokenizer)
                    result.update(info)
                else:
                    result.update(steps=0, tokens_trained=0, train_seconds=0.0, corpus=None)
                    result["train_phi"] = self.corpus_phi("reference", self.sft_dataset(), model, tokenizer)
                eval_start = time.perf_counter()
                result["eval"] = evaluate(model, tokenizer, self.cfg.eval_sets, self.cfg.eval_config,
                                          self.out / "methods" / spec.label / "eval")
                result["eval_seconds"] = time.perf_counter() - eval_start
                del model
                gc.collect()
            result["status"] = "ok"
            result["peak_rss_mib"] = mem.peak_rss_mib
            result["peak_cuda_mib"] = mem.peak_cuda_mib
        except MethodUnavailable as err:
            result.update(status="unavailable", error=str(err))
        except Exception as err:  # a crash in one method must not stop the others
            result.update(status="failed", error=f"{type(err).__name__}: {err}",
                          traceback=traceback.format_exc(limit=20)[-4000:])
        result["wall_seconds"] = time.perf_counter() - start
        result["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        gc.collect()
        return result

    # ---- the whole run ---------------------------------------------------------------------------------------------

    def run(self) -> dict:
        if self.cfg.num_threads:
            # on a shared CPU one thread per process is often several times faster than oversubscribed threads
            torch.set_num_threads(int(self.cfg.num_threads))
        self.out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.out / "config.json", self.config_dict())
        results = {}
        for spec in self.cfg.method_specs:
            path = self.result_path(spec)
            if path.is_file():
                previous = json.loads(path.read_text())
                if previous.get("status") == "ok" or not self.cfg.rerun_failed:
                    print(f"[compare] {spec.label}: already done ({previous.get('status')}), skipping", flush=True)
                    results[spec.label] = previous
                    continue
            print(f"[compare] {spec.label}: running", flush=True)
            result = self.run_method(spec)
            write_json_atomic(path, result)
            results[spec.label] = result
            msg = result.get("error", "")
            print(f"[compare] {spec.label}: {result['status']} in {result['wall_seconds']:.0f} s {msg}".rstrip(), flush=True)
            self.report(results)
        return self.report(results)

    def config_dict(self) -> dict:
        c = self.cfg
        return {
            "model_name_or_path": c.model_name_or_path, "output_dir": c.output_dir, "data": asdict(c.data),
            "budget": asdict(c.budget), "eval": {"sets": [asdict(s) for s in c.eval_sets], **asdict(c.eval_config)},
            "methods": [asdict(m) for m in c.method_specs], "pairs": c.pairs, "hinted": c.hinted, "online": c.online,
            "phi": c.phi, "dtype": c.dtype,
        }

    def report(self, results: dict) -> dict:
        summary = summarize(results, self.cfg.eval_sets)
        payload = {"config": self.config_dict(), "methods": summary}
        write_json_atomic(self.out / "results.json", payload)
        (self.out / "results.md").write_text(results_markdown(summary, self.cfg.eval_sets, self.cfg.title))
        try:
            plot_results(summary, self.cfg.eval_sets, self.out / "compare_accuracy.png", self.cfg.title)
        except Exception as err:  # a missing plotting backend must not lose the numbers
            print(f"[compare] plot skipped: {err}", file=sys.stderr)
        return payload


# ----------------------------------------------------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------------------------------------------------


def summarize(results: dict, sets: list[EvalSet]) -> dict:
    """Per method: status, accuracy (and CI) per set, mean over sets, change vs base on retention sets, and cost."""
    base = next((r for r in results.values() if r.get("method") == "base" and r.get("status") == "ok"), None)
    out = {}
    for label, r in results.items():
        row = {k: r.get(k) for k in ("method", "status", "error", "steps", "tokens_trained", "train_seconds",
                                     "eval_seconds", "wall_seconds", "peak_rss_mib", "peak_cuda_mib", "num_train_samples",
                                     "corpus", "args")}
        row["train_phi"] = (r.get("train_phi") or {}).get("mean_phi")
        row["rejected_phi"] = (r.get("rejected_phi") or {}).get("mean_phi")
        if r.get("pairs"):
            row["pairs"] = r["pairs"]
        if r.get("hinted_summary"):
            row["hinted"] = r["hinted_summary"]
        ev = r.get("eval") or {}
        row["sets"] = {s.name: {k: ev[s.name][k] for k in ("accuracy", "ci_low", "ci_high", "num_prompts", "k", "ci_method")}
                       for s in sets if s.name in ev}
        accs = [row["sets"][s.name]["accuracy"] for s in sets if s.name in row["sets"]]
        row["mean_accuracy"] = sum(accs) / len(accs) if accs and len(accs) == len(sets) else None
        if base is not None and ev:
            row["change_vs_base"] = {
                s.name: ev[s.name]["accuracy"] - base["eval"][s.name]["accuracy"]
                for s in sets if s.name in ev and s.name in base.get("eval", {})
            }
            ret = [row["change_vs_base"][s.name] for s in sets if s.role == "retention" and s.name in row["change_vs_base"]]
            row["retention_change"] = sum(ret) / len(ret) if ret else None
        else:
            row["change_vs_base"], row["retention_change"] = {}, None
        out[label] = row
    return out


def _pct(x):
    return "–" if x is None else f"{100 * x:.1f}"


def results_markdown(summary: dict, sets: list[EvalSet], title: str | None = None) -> str:
    lines = [f"# {title or 'Method comparison'}", ""]
    head = ["method", "status"] + [f"{s.name} ({s.role}) % [95% CI]" for s in sets]
    head += ["mean %", "retention Δ vs base (pts)", "train phi (base)", "steps", "tokens trained", "train s", "wall s", "peak RSS MiB"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for label, r in summary.items():
        cells = [label, r["status"]]
        for s in sets:
            m = r["sets"].get(s.name)
            cells.append(f"{_pct(m['accuracy'])} [{_pct(m['ci_low'])}, {_pct(m['ci_high'])}]" if m else "–")
        rc = r.get("retention_change")
        cells += [
            _pct(r.get("mean_accuracy")),
            "–" if rc is None else f"{100 * rc:+.1f}",
            "–" if r.get("train_phi") is None else f"{r['train_phi']:.3f}",
            str(r.get("steps") if r.get("steps") is not None else "–"),
            str(r.get("tokens_trained") if r.get("tokens_trained") is not None else "–"),
            "–" if r.get("train_seconds") is None else f"{r['train_seconds']:.0f}",
            "–" if r.get("wall_seconds") is None else f"{r['wall_seconds']:.0f}",
            "–" if r.get("peak_rss_mib") is None else f"{r['peak_rss_mib']:.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    notes = [(label, r) for label, r in summary.items() if r["status"] != "ok"]
    if notes:
        lines += ["Methods that did not finish:", ""]
        lines += [f"- `{label}` ({r['status']}): {r.get('error')}" for label, r in notes]
        lines.append("")
    pairs = next((r["pairs"] for r in summary.values() if r.get("pairs")), None)
    if pairs:
        lines += ["Preference pairs (DPO/SimPO): " + ", ".join(f"{k}={v}" for k, v in pairs.items()), ""]
    hinted = next((r["hinted"] for r in summary.values() if r.get("hinted")), None)
    if hinted:
        keys = ("num_samples", "num_kept", "accuracy", "fallback", "num_realigned_used", "num_reference_used")
        lines += ["Hinted-Decoding corpus: " + ", ".join(f"{k}={hinted.get(k)}" for k in keys if k in hinted), ""]
    lines += [
        "Accuracy: greedy pass@1 with a Wilson 95% interval (avg@k: normal interval over per-prompt scores). "
        "Retention Δ: mean change of the retention sets' accuracy vs `base`, in points. Train phi: mean DDT phi "
        "(log p + H) of the method's training responses under the base model (0 = on-policy). Peak RSS: the whole "
        "process, sampled, so it includes the evaluation and the base model loaded for it.",
        "",
    ]
    return "\n".join(lines)


def plot_results(summary: dict, sets: list[EvalSet], path: str | Path, title: str | None = None) -> None:
    """Grouped bar chart: one group per evaluation set, one bar per method, 95% interval as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [label for label, r in summary.items() if r["status"] == "ok"]
    if not labels:
        return
    width = 0.8 / len(labels)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(sets) + 0.4 * len(labels)), 4))
    for j, label in enumerate(labels):
        r = summary[label]
        xs, ys, lo, hi = [], [], [], []
        for i, s in enumerate(sets):
            m = r["sets"].get(s.name)
            if m is None:
                continue
            xs.append(i - 0.4 + width * (j + 0.5))
            ys.append(100 * m["accuracy"])
            lo.append(100 * (m["accuracy"] - m["ci_low"]))
            hi.append(100 * (m["ci_high"] - m["accuracy"]))
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=label)
    ax.set_xticks(range(len(sets)))
    ax.set_xticklabels([f"{s.name}\n({s.role})" for s in sets])
    ax.set_ylabel("accuracy % (95% CI)")
    ax.set_ylim(0, 100)
    ax.set_title(title or "Method comparison")
    ax.legend(fontsize=8, ncol=min(len(labels), 5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or "--config" not in argv:
        print(__doc__)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    i = argv.index("--config")
    path = argv[i + 1]
    rest = argv[:i] + argv[i + 2 :]
    config = load_config_file(path, _parse_overrides(rest))
    payload = Comparison(config).run()
    print((Path(config.output_dir) / "results.md").read_text())
    failed = [label for label, r in payload["methods"].items() if r["status"] != "ok"]
    if failed:
        print(f"[compare] methods that did not finish: {failed} (see results.md)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
