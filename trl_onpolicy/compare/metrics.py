"""What a comparison measures besides accuracy, and what each unit costs.

- `PeakMemory`: peak resident memory (and CUDA peak allocation) of a unit;
- `token_counter_callback`: counts the non-padding tokens a trainer trains on, and stops it at ``budget.max_tokens``;
- `measure`: KL(base || trained) on held-out in-domain and general prompts, and the held-out NLL of reference
  solutions (`trl_onpolicy.eval.forgetting`), on the base model's cached samples (`base_samples`);
- `corpus_phi`: the mean DDT phi of a training corpus under the base model (cached);
- `library_versions`: the versions of the libraries that produced a result (recorded in every unit).
"""

from __future__ import annotations

import importlib.metadata
import os
import threading
import time
from typing import Any

import torch

from trl_onpolicy.compare.units import corpus_lock
from trl_onpolicy.utils.fingerprint import data_fingerprint
from trl_onpolicy.utils.io import read_json, write_json_atomic

# the libraries whose version can change a unit's numbers (recorded in each result, compared in the report)
VERSIONED = {"torch": "torch", "transformers": "transformers", "trl": "trl", "trl_onpolicy": "trl-onpolicy"}


def library_versions() -> dict[str, str | None]:
    """``{"torch": "2.13.0", ...}`` for `VERSIONED` (None for a library that is not installed)."""
    out = {}
    for name, dist in VERSIONED.items():
        try:
            out[name] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


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


def batch_tokens(inputs) -> int:
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


def token_counter_callback(trainer, max_tokens: int | None):
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
            counter["tokens"] += batch_tokens(inputs)
        try:
            return original(model, inputs, *args, **kwargs)
        finally:
            raw_rows["active"] = False

    def prepare_inputs(inputs, *args, **kwargs):
        batch = original_prepare(inputs, *args, **kwargs)
        if raw_rows["active"] and isinstance(batch, Mapping):
            counter["tokens"] += batch_tokens(batch)
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


def metric_record(r: dict) -> dict:
    """A `trl_onpolicy.eval.forgetting` result as stored in a unit: ``mean`` (its token-weighted headline value, ``kl`` or
    ``nll``), the interval, counts, and the per-prompt values (None for a prompt without tokens)."""
    out = {k: (float(v) if isinstance(v, float) else v) for k, v in r.items()
           if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
    out["mean"] = float(r["mean"] if "mean" in r else r["kl"] if "kl" in r else r["nll"])
    if "per_prompt" in r:
        out["per_prompt"] = [None if x is None else float(x) for x in r["per_prompt"]]
    return out


@corpus_lock(lambda name, *_: f"phi_{name}")
def corpus_phi(comparison, name: str, dataset, model, tokenizer) -> dict | None:
    """Mean phi (DDT) of a training corpus under the base model, cached in corpora/phi_<name>.json."""
    if not comparison.cfg.phi.get("enabled", True):
        return None
    path = comparison.out / "corpora" / f"phi_{name}.json"
    fp = comparison.cache_fingerprint(corpus=data_fingerprint(dataset), phi=comparison.cfg.phi,
                                      max_length=comparison.cfg.budget.max_length)
    cached = read_json(path)
    if cached is not None and not comparison.stale(f"corpora/phi_{name}.json", cached.get("fingerprint"), fp):
        return cached
    n = min(len(dataset), int(comparison.cfg.phi.get("max_samples") or len(dataset)))
    subset = dataset.select(range(n)) if hasattr(dataset, "select") else dataset[:n]
    from trl_onpolicy.ddt.scoring import score_dataset

    result = score_dataset(model, tokenizer, subset, max_length=comparison.cfg.budget.max_length,
                           batch_size=int(comparison.cfg.phi.get("batch_size", 8)), progress=comparison.progress,
                           desc=f"DDT phi ({name})")
    s = result.summary
    info = {"mean_phi": s.get("mean_phi"), "std_phi": s.get("std_phi"), "num_tokens": s.get("num_tokens"),
            "num_samples": s.get("num_samples"), "source": "trl_onpolicy.ddt.scoring.score_dataset", "fingerprint": fp}
    write_json_atomic(path, info)
    return info


@corpus_lock(lambda which, *_: f"base_samples_{which}")
def base_samples(comparison, which: str, base_model=None, tokenizer=None) -> list:
    """The base model's temperature-1 samples (token ids) for one KL prompt set: generated once per study into
    ``corpora/base_samples_<which>.json`` with the fingerprint of the model, the prompts and the sampling settings,
    and regenerated when any of them changed."""
    from trl_onpolicy.eval import forgetting

    m = comparison.cfg.metrics
    prompts = comparison.prompt_set(which)
    path = comparison.out / "corpora" / f"base_samples_{which}.json"
    fp = comparison.cache_fingerprint(prompts=data_fingerprint(prompts), max_new_tokens=m.kl_max_new_tokens,
                                      seed=m.sample_seed, temperature=1.0)
    cached = read_json(path)
    if cached is not None and not comparison.stale(f"corpora/base_samples_{which}.json", cached.get("fingerprint"), fp):
        return cached["responses"]
    own = base_model is None
    if own:
        base_model, tokenizer = comparison.load_base()
    start = time.perf_counter()
    responses = forgetting.sample_base_responses(base_model, tokenizer, prompts, max_new_tokens=m.kl_max_new_tokens,
                                                 seed=m.sample_seed, batch_size=m.batch_size, progress=comparison.progress)
    responses = [[int(t) for t in r] for r in responses]
    write_json_atomic(path, {"fingerprint": fp, "num_prompts": len(prompts), "seconds": time.perf_counter() - start,
                             "responses": responses})
    if own:
        del base_model
    return responses


def measure(comparison, model, tokenizer, is_base: bool) -> dict:
    """KL(base || model) on the in-domain and general prompt sets and the held-out NLL (forward passes only)."""
    m = comparison.cfg.metrics
    out: dict[str, Any] = {}
    if not (m.kl or m.nll):
        return out
    from trl_onpolicy.eval import forgetting

    start = time.perf_counter()
    if m.kl:
        base_model = None if is_base else comparison.load_base()[0]
        for which in ("in_domain", "general"):
            responses = base_samples(comparison, which, model if is_base else base_model, tokenizer)
            if is_base:  # KL of a model to itself is 0 exactly; no forward pass needed
                n = len(responses)
                out[f"kl_{which}"] = {"mean": 0.0, "ci_low": 0.0, "ci_high": 0.0, "num_prompts": n}
                continue
            if which not in comparison.base_hidden_cache:
                comparison.base_hidden_cache[which] = forgetting.base_hidden_states(
                    base_model, tokenizer, comparison.prompt_set(which), responses, batch_size=m.batch_size,
                    progress=comparison.progress)
            r = forgetting.kl_to_base(base_model, model, tokenizer, comparison.prompt_set(which), responses,
                                      batch_size=m.batch_size, base_hidden=comparison.base_hidden_cache[which],
                                      progress=comparison.progress)
            out[f"kl_{which}"] = metric_record(r)
        del base_model
    if m.nll:
        nll = forgetting.heldout_nll(model, tokenizer, comparison.nll_rows(), batch_size=m.batch_size,
                                     progress=comparison.progress)
        out["heldout_nll"] = metric_record(nll)
    out["metrics_seconds"] = time.perf_counter() - start
    return out


def answer_shares(records: list[dict], marker: str) -> dict:
    """Over every sample of an evaluation's per-prompt records (``samples``: ``response``, ``finished``): the share
    cut off (it hit ``max_new_tokens`` before an end token) and the share whose response contains ``marker`` (the
    answer format's ``####``)."""
    samples = [s for r in records for s in r["samples"]]
    if not samples:
        return {"cut_off": None, "marker": None, "samples": 0}
    return {"cut_off": sum(not s["finished"] for s in samples) / len(samples),
            "marker": sum(marker in s["response"] for s in samples) / len(samples), "samples": len(samples)}


def item_records(eval_dir, names: list[str], marker: str) -> dict:
    """From a unit's per-prompt evaluation files (``eval_dir/<set>.jsonl``): ``items`` (each set's per-problem
    scores in problem order, for the paired item-level tests of the report) and ``format`` (`answer_shares` per
    set)."""
    import json
    from pathlib import Path

    items, shares = {}, {}
    for name in names:
        path = Path(eval_dir) / f"{name}.jsonl"
        if not path.is_file():
            continue
        records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        items[name] = [float(r["score"]) for r in records]
        shares[name] = answer_shares(records, marker)
    return {"items": items, "format": shares}
