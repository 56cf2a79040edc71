"""The comparison itself: `Comparison` trains, evaluates and measures every unit of a sweep, resumes finished ones,
shares the sweep with other processes, and writes the report.

The recipe is `trl_onpolicy.compare.config`; units, claims and resume rules are `trl_onpolicy.compare.units`; each
method's trainer comes from the registry in `trl_onpolicy.compare.methods`; KL, held-out NLL, memory and token counts
are `trl_onpolicy.compare.metrics`; tables and plots are `trl_onpolicy.compare.report`. The command is
`trl_onpolicy.compare.cli` (its help describes the recipe and the output folder).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from trl_onpolicy.compare import metrics, units as unit_rules
from trl_onpolicy.compare.config import DEV_SET, CompareConfig, without_new_defaults
from trl_onpolicy.compare.methods import REGISTRY, MethodUnavailable
from trl_onpolicy.compare.report import write_report
from trl_onpolicy.compare.units import Unit
from trl_onpolicy.eval.evaluation import EvalSet, evaluate, evaluate_set, load_eval_set
from trl_onpolicy.utils.fingerprint import changed_keys, data_fingerprint, model_fingerprint, settings_fingerprint
from trl_onpolicy.utils.errors import work_started
from trl_onpolicy.utils.io import file_lock, read_json, write_json_atomic
from trl_onpolicy.utils.validation import (
    check_hub_model,
    check_input_path,
    check_model_source,
    check_output_path,
    invalid,
    looks_like_local_path,
)

GENERAL_PROMPTS = Path(__file__).parents[1] / "eval" / "resources" / "general_prompts.jsonl"


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
        self._dev_rows = None
        self.base_hidden_cache: dict[str, list] = {}  # the base side of the KL, once per process and prompt set

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the base model is evaluated in and builds the corpora in (``dtype`` of the recipe)."""
        return getattr(torch, self.cfg.dtype)

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
        """The start model (in the recipe's ``dtype``, eval mode, on the device) and its tokenizer."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=self.dtype).to(self.device)
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
                        max_solution_chars=d.max_solution_chars, **self._template_kwargs(), **d.task_kwargs,
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

    def _template_kwargs(self) -> dict:
        """``{"prompt_template": ...}`` for the task generator when the recipe sets one (else nothing: same call)."""
        template = self.cfg.data.prompt_template
        return {} if template == "{question}" else {"prompt_template": template}

    def dev_rows(self) -> list[dict]:
        """The DEV split (``data.dev_n``): the problems the training generator yields right after the ``n`` training
        ones (its sequence does not depend on how many are asked for), with every training question removed, so they
        are held out from training and, being training-split questions, from every test-split set; [] without it."""
        d = self.cfg.data
        if not d.dev_n:
            return []
        if self._dev_rows is None:
            train_questions = {_text_of(r.get("prompt")) for r in self.train_rows()}
            if d.path:
                from trl_onpolicy.data.datasets import load_sft_dataset

                rows = list(load_sft_dataset(d.path))[d.n :]
            else:
                from trl_onpolicy.data.datasets import math_word_problems

                rows = list(math_word_problems(
                    len(self.train_rows()) + d.dev_n, seed=d.seed, task=d.task, split="train", answer_format=d.answer_format,
                    max_solution_chars=d.max_solution_chars, **self._template_kwargs(), **d.task_kwargs))
            rows = [r for r in rows if _text_of(r.get("prompt")) not in train_questions][: d.dev_n]
            if any("answer" not in r for r in rows):
                raise ValueError("data.dev_n needs an `answer` column in the training data to grade the DEV split.")
            if len(rows) < d.dev_n:
                raise ValueError(f"data.dev_n={d.dev_n}: only {len(rows)} problems beyond the training ones are available; "
                                 "ask for fewer.")
            self._dev_rows = [{"id": i, "prompt": r["prompt"], "answer": str(r["answer"])} for i, r in enumerate(rows)]
        return self._dev_rows

    def dev_set(self) -> EvalSet:
        """How the DEV split is generated and graded: the first in-domain set's settings, with the DEV rows."""
        first = next((s for s in self.cfg.eval_sets if s.role == "in_domain"), None)
        spec = {"checker": first.checker, "extract_order": first.extract_order} if first is not None else {}
        return EvalSet(name=DEV_SET, task=self.cfg.data.task, role="in_domain", **spec)

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
                    if "prompt_template" not in m.kl_prompts:
                        spec.update(self._template_kwargs())
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
                                               **self._template_kwargs(), **d.task_kwargs))
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
        self.check_precision()

        def load(where, fn, *args):
            try:
                return fn(*args)
            except (ImportError, RuntimeError) as err:  # e.g. a task that cannot give that many distinct problems
                raise ValueError(f"{where}: {err}") from None

        load("data", self.train_rows)
        load("data.dev_n", self.dev_rows)
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
            if c.data.dev_n:  # (recipes without a DEV split keep the eval fingerprint they had)
                eval_settings["dev"] = {"n": c.data.dev_n, "rows": data_fingerprint(self.dev_rows()),
                                        "set": asdict(self.dev_set())}
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
        budget = {k: v for k, v in without_new_defaults("budget", asdict(c.budget)).items() if k not in ("learning_rate", "seed")}
        settings = {"method": name, "args": unit.spec.args, "learning_rate": unit.lr, "seed": unit.seed, "budget": budget}
        method = REGISTRY[name]
        if method.settings is not None:
            settings.update(method.settings(self))
        if c.dtype != "float32":  # (float32 units keep the fingerprints they had before mixed precision was added)
            settings["precision"] = f"float32 master weights, {c.dtype} autocast"
        return settings

    def unit_fingerprint(self, unit: Unit) -> dict:
        return {**self.fingerprints(), "settings": settings_fingerprint(self.unit_settings(unit))}

    # ---- cached corpora --------------------------------------------------------------------------------------------

    def cache_fingerprint(self, **settings) -> dict:
        """The fingerprint of a corpus the base model builds: model, data, dtype and the corpus' own settings."""
        fp = self.fingerprints()
        return {"model": fp["model"], "data": fp["data"], "dtype": fp["dtype"], "settings": settings_fingerprint(settings)}

    def stale(self, what: str, stored: dict | None, current: dict) -> bool:
        """Whether a cached corpus must be rebuilt (and say why when it was built from something else)."""
        changed = changed_keys(stored, current)
        if changed and stored is not None:
            print(f"[compare] {what} was built from a different {', '.join(changed)}; rebuilding it", flush=True)
        return bool(changed)

    # ---- training --------------------------------------------------------------------------------------------------

    def unit_dir(self, unit: Unit) -> Path:
        return unit_rules.unit_dir(self.out, unit)

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
            warmup_steps=b.warmup_steps if b.warmup_ratio is None else b.warmup_ratio,  # a float < 1: share of the steps
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
            **self.precision_args(),
            **({} if b.adam_beta2 is None else {"adam_beta2": b.adam_beta2}),
        )

    def precision_args(self) -> dict:
        """Training keeps float32 master weights; a ``bfloat16``/``float16`` recipe trains under that autocast (an
        Adam step of 1e-5 is below half a bf16 ulp of most weights: trained in bf16 itself, they would not move)."""
        cpu = {"use_cpu": True} if self.device == "cpu" else {}
        if self.cfg.dtype == "float32":
            return {**cpu, "bf16": False} if cpu else {}
        return {**cpu, "bf16": self.cfg.dtype == "bfloat16", "fp16": self.cfg.dtype == "float16"}

    def check_precision(self) -> None:
        """The recipe's ``dtype`` must be one this machine can autocast to."""
        if self.cfg.dtype == "float16" and self.device == "cpu":
            raise invalid(None, "dtype", "float16", "float16 mixed precision needs a CUDA GPU; use bfloat16 or float32 here")
        if self.cfg.dtype == "bfloat16" and self.device == "cuda" and not torch.cuda.is_bf16_supported():
            raise invalid(None, "dtype", "bfloat16", "this GPU has no bfloat16 support; use float16 or float32")

    def trainer_config(self, unit: Unit):
        """The trainer configuration of a unit (built during validation too, so a bad ``args`` value fails before any
        training). ``sdft`` returns its argument mapping (its wrapper builds the config)."""
        args = {**self.common_args(unit), **unit.spec.args}
        try:
            return REGISTRY[unit.spec.name].config(self, args, self.cfg.budget.max_length)
        except (TypeError, ValueError) as err:  # an unknown keyword or a bad value
            raise ValueError(f"methods[{unit.spec.label}].args: {err}") from None

    def train(self, unit: Unit, model, tokenizer) -> tuple[dict, Any]:
        """Train ``model`` with the unit's method; returns training facts (steps, tokens, seconds, logs) and the
        trained model (float32 master weights)."""
        method = REGISTRY[unit.spec.name]
        info: dict[str, Any] = {}
        config = self.trainer_config(unit)
        data = method.corpus(self, model, tokenizer, info)  # corpora are built by the base model in the recipe's dtype
        model = model.float()  # float32 master weights (a no-op for float32); the trainer autocasts (precision_args)
        trainer = method.trainer(self, unit, config, model, tokenizer, data)
        counter = metrics.token_counter_callback(trainer, self.cfg.budget.max_tokens)
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

    # ---- one unit ------------------------------------------------------------------------------------------------

    def units(self) -> list[Unit]:
        """Every unit of the sweep (`trl_onpolicy.compare.units.sweep_units`)."""
        return unit_rules.sweep_units(self.cfg)

    def run_unit(self, unit: Unit) -> dict:
        """Train (unless base), evaluate and measure one unit; always returns a result dict (failures included)."""
        spec = unit.spec
        result: dict[str, Any] = {"key": unit.key, "label": spec.label, "method": spec.name, "args": spec.args,
                                  "learning_rate": unit.lr, "seed": unit.seed, "status": "running",
                                  "versions": metrics.library_versions()}
        start = time.perf_counter()
        try:
            with metrics.PeakMemory() as mem:
                model, tokenizer = self.load_base()
                torch.manual_seed(unit.seed if unit.seed is not None else self.cfg.budget.seed)
                if spec.name != "base":
                    info, model = self.train(unit, model, tokenizer)
                    result.update(info)
                    model = model.to(self.dtype)  # evaluated in the dtype the base model is evaluated in
                else:
                    result.update(steps=0, tokens_trained=0, train_seconds=0.0, corpus=None)
                    result["train_phi"] = metrics.corpus_phi(self, "reference", self.sft_dataset(), model, tokenizer)
                eval_start = time.perf_counter()
                eval_config = self.cfg.eval_config
                if unit.seed is not None and eval_config.temperature > 0:
                    eval_config = dataclasses.replace(eval_config, seed=unit.seed)
                eval_dir = self.unit_dir(unit) / "eval"
                result["eval"] = evaluate(model, tokenizer, self.cfg.eval_sets, eval_config, eval_dir)
                if self.cfg.data.dev_n:
                    result["dev_eval"] = evaluate_set(model, tokenizer, self.dev_set(), eval_config,
                                                      eval_dir / f"{DEV_SET}.jsonl", rows=self.dev_rows())
                result.update(metrics.item_records(eval_dir, [s.name for s in self.cfg.eval_sets]
                                                   + ([DEV_SET] if self.cfg.data.dev_n else []), self.answer_marker))
                result["eval_seconds"] = time.perf_counter() - eval_start
                result["metrics"] = metrics.measure(self, model, tokenizer, is_base=spec.name == "base")
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
        work_started()  # from here on an error is a failed run (traceback, exit 1), not bad input
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
            if ran:  # tables after every unit; plots at the end
                self.interim_report(units, results)
        try:
            return self.report(self._with_others(units, results))
        except OSError as err:  # not bad input: the sweep's results are kept in the unit folders
            raise RuntimeError(f"writing the final report into {self.out} failed: {err}") from err

    def interim_report(self, units: list[Unit], results: dict) -> None:
        """The report after one unit (no plots). It is only a view of the unit files: when writing it fails (a full
        disk, a folder another process is replacing), a warning is printed and the sweep goes on."""
        try:
            self.report(self._with_others(units, results), plots=False)
        except Exception as err:  # noqa: BLE001 - never let a report kill a worker mid-sweep
            print(f"[compare] warning: the interim report could not be written ({type(err).__name__}: {err}); "
                  "the sweep goes on and the final report will include this unit", file=sys.stderr, flush=True)

    def _with_others(self, units: list[Unit], results: dict) -> dict:
        """``results`` plus the units stored by now (by other processes or earlier runs), in the sweep's order; a
        stored result of another configuration is included, marked ``"stale"`` (`stored`)."""
        out = {}
        for unit in units:
            done = results.get(unit.key) or self.stored(unit)
            if done is not None:
                out[unit.key] = done
        return out

    def claim_path(self, unit: Unit) -> Path:
        return unit_rules.claim_path(self.out, unit)

    def stored(self, unit: Unit) -> dict | None:
        """The stored result of ``unit`` when it finished (status ok): as stored when it matches this configuration,
        else a copy marked ``"stale": [what changed]`` (``["model"]``, ...); None when there is none."""
        path = self.result_path(unit)
        previous = read_json(path) if path.is_file() else None
        if previous is None or previous.get("status") != "ok":
            return None
        changed = unit_rules.staleness(previous, self.unit_fingerprint(unit))
        return {**previous, "stale": changed} if changed else previous

    def finished(self, unit: Unit) -> dict | None:
        """The stored result of ``unit`` when it finished (status ok) under this configuration, else None."""
        result = self.stored(unit)
        return None if result is None or result.get("stale") else result

    def _run_claimed(self, unit: Unit, tag: str) -> tuple[dict, bool]:
        """Run ``unit`` (held by this process) unless its stored result is current (finished, or failed with
        ``rerun_failed: false``); returns the result and whether it ran now."""
        path = self.result_path(unit)
        fp = self.unit_fingerprint(unit)
        settings = self.unit_settings(unit)
        previous = read_json(path) if path.is_file() else None  # read under the claim: another process may have just finished it
        reuse, message = unit_rules.resume_decision(previous, fp, settings, self.cfg.rerun_failed)
        if message:
            print(f"{tag}: {message}", flush=True)
        if reuse:
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
            "model_name_or_path": c.model_name_or_path, "output_dir": c.output_dir,
            "data": without_new_defaults("data", asdict(c.data)), "budget": without_new_defaults("budget", asdict(c.budget)), "sweep": asdict(c.sweep), "metrics": asdict(c.metrics),
            "eval": {"sets": [asdict(s) for s in c.eval_sets], **asdict(c.eval_config)},
            "methods": [asdict(m) for m in c.method_specs], "pairs": c.pairs, "hinted": c.hinted, "online": c.online,
            "sdft": c.sdft, "phi": c.phi, "dtype": c.dtype, "fingerprint": self._fp,
        }

    @property
    def answer_marker(self) -> str:
        """The text every answer in the training format contains (``####`` or ``\\boxed``)."""
        return "\\boxed" if self.cfg.data.answer_format == "boxed" else "####"

    def report(self, results: dict, plots: bool = True) -> dict:
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


