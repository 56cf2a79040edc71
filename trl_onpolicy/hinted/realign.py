"""Re-align a (question, reference solution) corpus to a model with Hinted Decoding: `trl-onpolicy realign`.

For every sample the model writes a new response in two lock-stepped streams (`trl_onpolicy.hinted.decoding.hinted_decode`):
a *hinted* prompt that shows the question and the reference solution, and the *plain* prompt (the ordinary training
prompt, the question alone). The result stays correct (guided by the reference) while staying close to the model's
own distribution. Each response is then scored with DDT under the plain prompt (mean phi, z, share of tokens with phi
above -1/-3/-5), its final answer is checked (math-verify by default, or any callable), and filters drop unfinished,
wrong or off-distribution responses.

Output folder (``output_dir``)::

    train.jsonl          kept samples, TRL prompt-completion format (+ statistics columns); load_dataset("json", ...)
    summary.json         counts per filter, mean statistics of re-aligned and reference responses
    shards/shard-*.jsonl every sample (kept or not, with `drop_reason`), one file per shard of `shard_size` rows
    manifest.json        the settings the shards were made with (a resumed run must use the same ones)

Shards are written to a temporary file and renamed into place, so a shard file is either complete or absent: an
interrupted run re-started with the same command skips the finished shards and loses or duplicates nothing. Row
``i`` of the dataset is decoded with its own seed ``seed + i``, so the result does not depend on where a run was
interrupted, on the batch size, nor on the number of processes. Under ``torchrun``/``accelerate launch`` each process takes the shards ``i`` with
``i % num_processes == rank``; the main process merges when all are done.

Library use: `realign_dataset(model, tokenizer, dataset, config)`; the CLI is `main(argv)`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from trl_onpolicy.data.prompts import render_prompt_ids
from trl_onpolicy.eval.answers import gold_answer
from trl_onpolicy.hinted.acceptance import (  # noqa: F401  (Acceptance, response_statistics: re-exported)
    Acceptance,
    accept_response,
    completion_text,
    resolve_checker,
    response_statistics,
)
from trl_onpolicy.hinted.prompts import (  # noqa: F401  (hinted_messages: re-exported)
    DEFAULT_ANALYSIS_HEADER,
    DEFAULT_HINT_TEMPLATE,
    DEFAULT_SOLUTION_HEADER,
    build_hinted_prompt_ids,
    check_hint_template,
    hinted_messages,
    plain_prompt,
    sample_continuations,
)
from trl_onpolicy.utils.distributed import end_processes, process_state
from trl_onpolicy.utils.errors import work_started
from trl_onpolicy.utils.generation import eos_token_ids
from trl_onpolicy.utils.io import atomic_write_text
from trl_onpolicy.utils.models import load_model


# settings that change the generated samples: a resumed run must use the same values
_SAMPLE_FIELDS = (
    "model_name_or_path", "dataset_name", "dataset_config", "dataset_split", "question_column", "reference_column",
    "answer_column", "prompt_column", "system_prompt", "hint_template", "analysis_max_new_tokens", "analysis_header",
    "analysis_stop", "solution_header", "beta", "lambda_mode", "lambda_center", "lambda_h1", "lambda_h2", "splitter", "max_new_tokens", "temperature", "top_p",
    "seed", "shard_size", "max_samples", "dtype", "own_samples",
)
FINISH_REASONS = ("eos", "length", "repetition")
FRAC_KEYS = ("frac_phi_gt_-1", "frac_phi_gt_-3", "frac_phi_gt_-5")


@dataclass
class RealignConfig:
    r"""
    Settings of a Hinted-Decoding re-alignment job (`trl-onpolicy realign --config recipe.yaml`; CLI flags override).

    Parameters:
        > Model and data

        model_name_or_path (`str`):
            Model (Hub id, local folder, or the embedded alias `embedded:smollm2-135m-instruct`).
        dataset_name (`str`):
            Dataset: a Hub name, a local folder (saved with `save_to_disk` or holding data files), or a
            `.json`/`.jsonl`/`.parquet`/`.csv` file.
        dataset_config (`str` or `None`), dataset_split (`str`, defaults to `"train"`):
            Subset and split to load.
        question_column, reference_column (`str`, defaults to `"question"`, `"solution"`):
            Columns with the problem statement and the reference solution.
        answer_column (`str` or `None`, defaults to `"answer"`):
            Column with the final answer used to check correctness. When it is null, missing or empty for a row, the
            gold is the reference solution's final answer (its last `\\boxed{}`, else `#### N`; see
            `accept_response`), never the whole solution.
        prompt_column (`str` or `None`, defaults to `"prompt"`):
            Column with the ordinary training prompt (conversational or plain text). When absent, the plain prompt is
            the conversation before the last assistant turn of a `messages` row (system and earlier turns kept), else
            the chat template applied to the question (with `system_prompt` if set); see
            `trl_onpolicy.hinted.prompts.plain_prompt`.
        system_prompt (`str` or `None`):
            System message of the prompts built from the question (plain and hinted).

        > Prompts

        hint_template (`str`):
            User message of the hinted stream; `{question}` and `{reference}` are filled in.
        analysis_max_new_tokens (`int`, defaults to `0`):
            If > 0, the model first writes (greedily) a short analysis after `analysis_header`, stopped at
            `analysis_stop` or after this many tokens; the hinted stream then starts after the analysis and
            `solution_header`.
        analysis_header, analysis_stop, solution_header (`str`):
            See `analysis_max_new_tokens`.

        > Decoding (see `trl_onpolicy.hinted.decoding.hinted_decode`)

        beta (`float`, defaults to `3.0`), lambda_mode (`str`, defaults to `"linear"`), lambda_center,
        lambda_h1, lambda_h2 (`float`, the sigmoid and piecewise maps' parameters), splitter (`str` or `None`,
        defaults to `"\\boxed{"`), max_new_tokens (`int`, defaults to `512`), temperature (`float`, defaults to
        `0.3`), top_p (`float`, defaults to `0.95`), seed (`int`, defaults to `0`).

        > Job

        batch_size (`int`, defaults to `8`): samples decoded together.
        shard_size (`int`, defaults to `64`): samples per output shard (the unit of resumption and of data parallelism).
        max_samples (`int` or `None`): use only the first rows of the dataset.
        dtype (`str`, defaults to `"float32"`): model dtype (`float32`, `bfloat16`, `float16`, `auto`).
        output_dir (`str`): output folder.

        > Scoring and filters

        checker (`str`, defaults to `"math_verify"`): how the final answer is checked: `"none"` (no check), a name
            in `trl_onpolicy.eval.answers.CHECKERS` (`math_verify`, `numeric`, `exact`, `contains`) or
            `"package.module:function"`, a callable `(extracted_answer, gold) -> bool`. The answer is extracted from
            the response as `trl-onpolicy eval` does (`\\boxed{}`, `#### N`, last number).
        drop_unfinished (`bool`, defaults to `True`): drop responses that did not end with EOS.
        drop_incorrect (`bool`, defaults to `True`): drop responses whose answer the checker rejects.
        min_mean_phi (`float` or `None`): drop responses whose mean phi under the plain prompt is below this.
        score_reference (`bool`, defaults to `True`): also score the reference solution under the plain prompt (for
            the before/after comparison in summary.json).
        own_samples (`bool`, defaults to `False`): also sample the model's own response to the plain prompt (same
            sampler and length, `model.generate`), score it and check it: the on-policy yardstick in summary.json.
        score_batch_size (`int`, defaults to `8`): batch size of DDT scoring.
    """

    model_name_or_path: str | None = field(default=None, metadata={"help": "Model: Hub id, local folder or embedded alias."})
    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset, local folder, or json/jsonl/parquet/csv file."})
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset subset (Hub datasets)."})
    dataset_split: str = field(default="train", metadata={"help": "Dataset split."})
    output_dir: str | None = field(default=None, metadata={"help": "Output folder (shards, train.jsonl, summary.json)."})
    question_column: str = field(default="question", metadata={"help": "Column with the problem statement."})
    reference_column: str = field(default="solution", metadata={"help": "Column with the reference solution."})
    answer_column: str | None = field(default="answer", metadata={"help": "Column with the final answer (gold)."})
    prompt_column: str | None = field(default="prompt", metadata={"help": "Column with the training prompt, if any."})
    system_prompt: str | None = field(default=None, metadata={"help": "System message for prompts built from the question."})
    hint_template: str = field(default=DEFAULT_HINT_TEMPLATE, metadata={"help": "Hinted user message; {question}, {reference}."})
    analysis_max_new_tokens: int = field(default=0, metadata={"help": "Tokens of greedy analysis before the hinted stream (0: none)."})
    analysis_header: str = field(default=DEFAULT_ANALYSIS_HEADER, metadata={"help": "Text that opens the analysis."})
    analysis_stop: str = field(default="\n\n", metadata={"help": "The analysis is cut at the first occurrence of this."})
    solution_header: str = field(default=DEFAULT_SOLUTION_HEADER, metadata={"help": "Text between analysis and solution."})
    beta: float = field(default=3.0, metadata={"help": "Hinted Decoding beta (lambda = clamp(beta * H_norm, 0, 1))."})
    lambda_mode: str = field(default="linear", metadata={"help": "Lambda map: linear, sigmoid or piecewise."})
    lambda_center: float = field(default=0.5, metadata={"help": "Centre of the sigmoid lambda map."})
    lambda_h1: float = field(default=0.1, metadata={"help": "Lower entropy knot of the piecewise lambda map."})
    lambda_h2: float = field(default=0.4, metadata={"help": "Upper entropy knot of the piecewise lambda map."})
    splitter: str | None = field(default="\\boxed{", metadata={"help": "After this text only the plain stream decodes."})
    max_new_tokens: int = field(default=512, metadata={"help": "Maximum response length in tokens."})
    temperature: float = field(default=0.3, metadata={"help": "Sampling temperature (0: greedy)."})
    top_p: float = field(default=0.95, metadata={"help": "Top-p of the sampler."})
    seed: int = field(default=0, metadata={"help": "Seed; dataset row i is sampled with seed + i."})
    batch_size: int = field(default=8, metadata={"help": "Samples decoded together."})
    shard_size: int = field(default=64, metadata={"help": "Samples per output shard."})
    max_samples: int | None = field(default=None, metadata={"help": "Use only the first N rows."})
    dtype: str = field(default="float32", metadata={"help": "Model dtype: float32, bfloat16, float16 or auto."})
    checker: str = field(default="math_verify", metadata={"help": "none, math_verify, numeric, exact, contains, or module:function."})
    drop_unfinished: bool = field(default=True, metadata={"help": "Drop responses that did not end with EOS."})
    drop_incorrect: bool = field(default=True, metadata={"help": "Drop responses with a wrong final answer."})
    min_mean_phi: float | None = field(default=None, metadata={"help": "Drop responses with mean phi below this."})
    score_reference: bool = field(default=True, metadata={"help": "Also score the reference solutions (DDT)."})
    own_samples: bool = field(default=False, metadata={"help": "Also sample the model's own plain-prompt responses."})
    score_batch_size: int = field(default=8, metadata={"help": "Batch size of DDT scoring."})

    def __post_init__(self):
        from trl_onpolicy.hinted.sampling import LAMBDA_MODES
        from trl_onpolicy.utils.validation import check_choice, check_fields

        check_fields(self, REALIGN_RULES, owner="RealignConfig")
        check_choice("dtype", self.dtype, ("float32", "bfloat16", "float16", "auto"), "RealignConfig")
        check_choice("lambda_mode", self.lambda_mode, LAMBDA_MODES, "RealignConfig")
        if self.lambda_mode == "piecewise" and not self.lambda_h1 < self.lambda_h2:
            raise ValueError(f"RealignConfig.lambda_h1={self.lambda_h1!r} is invalid: it must be < lambda_h2={self.lambda_h2!r}.")
        check_hint_template(self.hint_template)


def _realign_rules():
    from trl_onpolicy.utils.validation import COUNT, NON_NEGATIVE, OPTIONAL_COUNT, PROBABILITY_OPEN_LOW, Range

    return {
        "analysis_max_new_tokens": Range(lo=0, integer=True), "beta": NON_NEGATIVE, "lambda_center": Range(),
        "lambda_h1": Range(), "lambda_h2": Range(), "max_new_tokens": COUNT, "temperature": NON_NEGATIVE,
        "top_p": PROBABILITY_OPEN_LOW, "seed": Range(integer=True), "batch_size": COUNT, "shard_size": COUNT,
        "max_samples": OPTIONAL_COUNT, "min_mean_phi": Range(optional=True), "score_batch_size": COUNT,
    }


REALIGN_RULES = _realign_rules()


# ----------------------------------------------------------------------------------------------------------------------
# Loading


def load_dataset_any(name: str, config: str | None = None, split: str = "train"):
    """A `datasets.Dataset` from a Hub name, a local folder or data file, or ``reasoning-gym:TASK:N``
    (`trl_onpolicy.data.datasets.load_sft_dataset`)."""
    from trl_onpolicy.data.datasets import load_sft_dataset

    return load_sft_dataset(name, split, **({"name": config} if config else {}))


# ----------------------------------------------------------------------------------------------------------------------
# The job


def _decode(model, tokenizer, hinted, plain, **kwargs):
    from trl_onpolicy.hinted.decoding import hinted_decode

    return hinted_decode(model, tokenizer, hinted, plain, **kwargs)


def _sample_settings(config: RealignConfig) -> dict:
    return {k: getattr(config, k) for k in _SAMPLE_FIELDS}


def _check_columns(dataset, config: RealignConfig):
    names = set(dataset.column_names)
    missing = [c for c in (config.question_column, config.reference_column) if c not in names]
    if missing:
        raise ValueError(
            f"The dataset has no column(s) {missing}; it has {sorted(names)}. Set question_column/reference_column "
            "to the columns holding the problem and its reference solution."
        )


def _shard_path(output_dir: Path, shard: int) -> Path:
    return output_dir / "shards" / f"shard-{shard:05d}.jsonl"


def realign_shard(model, tokenizer, rows: list[dict], indices: list[int], config: RealignConfig, shard: int,
                  checker: Callable | None, progress=None) -> list[dict]:
    """Re-align, score and check the rows of one shard; returns one output record per row (kept or not)."""
    eos = eos_token_ids(model, tokenizer)
    records = []
    for b0 in range(0, len(rows), config.batch_size):
        batch, batch_idx = rows[b0 : b0 + config.batch_size], indices[b0 : b0 + config.batch_size]
        prompts = [plain_prompt(ex, config) for ex in batch]
        plain_ids = [render_prompt_ids(tokenizer, p, example=ex) for p, ex in zip(prompts, batch)]
        questions = [str(ex[config.question_column]) for ex in batch]
        references = [str(ex[config.reference_column]) for ex in batch]
        hinted_ids, analyses = build_hinted_prompt_ids(
            model, tokenizer, questions, references, template=config.hint_template, system_prompt=config.system_prompt,
            analysis_max_new_tokens=config.analysis_max_new_tokens, analysis_header=config.analysis_header,
            analysis_stop=config.analysis_stop, solution_header=config.solution_header, contexts=prompts,
        )
        results = _decode(
            model, tokenizer, hinted_ids, plain_ids, beta=config.beta, lambda_mode=config.lambda_mode,
            splitter=config.splitter, max_new_tokens=config.max_new_tokens, temperature=config.temperature,
            top_p=config.top_p, seed=[config.seed + i for i in batch_idx], lambda_center=config.lambda_center,
            lambda_h1=config.lambda_h1, lambda_h2=config.lambda_h2,
        )
        responses = [list(r.token_ids) for r in results]
        stats = response_statistics(model, plain_ids, responses, batch_size=config.score_batch_size)
        ref_stats = [None] * len(batch)
        if config.score_reference:
            ref_ids = [tokenizer(r, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for r in references]
            ref_stats = response_statistics(model, plain_ids, ref_ids, batch_size=config.score_batch_size)
        own = None
        if config.own_samples:
            torch.manual_seed(config.seed + batch_idx[0])
            own = sample_continuations(model, tokenizer, plain_ids, config.max_new_tokens, temperature=config.temperature,
                                       top_p=config.top_p, keep_eos=True)
            own_stats = response_statistics(model, plain_ids, own, batch_size=config.score_batch_size)
        for j, ex in enumerate(batch):
            text = completion_text(tokenizer, responses[j], eos)
            answer = ex.get(config.answer_column) if config.answer_column else None
            verdict = accept_response(text, results[j].finish_reason, answer, references[j], checker,
                                      require_eos=config.drop_unfinished, require_correct=config.drop_incorrect)
            gold = answer if answer not in (None, "") else references[j]
            correct, reason = verdict.correct, verdict.reason
            if reason is None and config.min_mean_phi is not None and not (stats[j]["mean_phi"] >= config.min_mean_phi):
                reason = "low_phi"
            prompt = prompts[j]
            completion = text if isinstance(prompt, str) else [{"role": "assistant", "content": text}]
            record = {
                "index": batch_idx[j],
                "prompt": prompt,
                "completion": completion,
                "question": questions[j],
                "reference": references[j],
                "answer": None if gold in (None, "") else gold_answer(str(gold)),
                "finish_reason": results[j].finish_reason,
                "correct": correct,
                "keep": reason is None,
                "drop_reason": reason,
                **stats[j],
            }
            record["mean_lambda"] = float(results[j].lambda_mean)
            if analyses[j] is not None:
                record["analysis"] = analyses[j]
            if own is not None:
                own_text = completion_text(tokenizer, own[j], eos)
                record.update({f"own_{k}": v for k, v in own_stats[j].items()})
                record["own_completion"] = own_text
                record["own_finish_reason"] = "eos" if own[j] and own[j][-1] in eos else "length"
                own_finish = "eos" if own[j] and own[j][-1] in eos else "length"
                record["own_correct"] = accept_response(own_text, own_finish, answer, references[j], checker).correct
            if ref_stats[j] is not None:
                record.update({f"reference_{k}": v for k, v in ref_stats[j].items()})
                record["reference_correct"] = accept_response(references[j], "eos", answer, references[j], checker).correct
            records.append(record)
        if progress is not None:
            progress.update(len(batch))
    return records


def _mean(values):
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(values) / len(values) if values else None


def summarize(records: list[dict], config: RealignConfig) -> dict:
    kept = [r for r in records if r["keep"]]
    checked = [r for r in records if r["correct"] is not None]
    summary = {
        "num_samples": len(records),
        "num_kept": len(kept),
        "dropped": {reason: sum(r["drop_reason"] == reason for r in records) for reason in ("unfinished", "incorrect", "low_phi")},
        "finish_reasons": {reason: sum(r["finish_reason"] == reason for r in records) for reason in FINISH_REASONS},
        "accuracy": _mean([float(r["correct"]) for r in checked]) if checked else None,
        "realigned": {k: _mean([r[k] for r in records]) for k in ("mean_phi", "z", "num_tokens", *FRAC_KEYS)},
        "kept": {k: _mean([r[k] for r in kept]) for k in ("mean_phi", "z", "num_tokens")},
    }
    if records and "reference_mean_phi" in records[0]:
        summary["reference"] = {k: _mean([r[f"reference_{k}"] for r in records]) for k in ("mean_phi", "z", "num_tokens", *FRAC_KEYS)}
        ref_checked = [r for r in records if r.get("reference_correct") is not None]
        summary["reference"]["accuracy"] = _mean([float(r["reference_correct"]) for r in ref_checked]) if ref_checked else None
    if records and "own_mean_phi" in records[0]:
        summary["own"] = {k: _mean([r[f"own_{k}"] for r in records]) for k in ("mean_phi", "z", "num_tokens", *FRAC_KEYS)}
        own_checked = [r for r in records if r.get("own_correct") is not None]
        summary["own"]["accuracy"] = _mean([float(r["own_correct"]) for r in own_checked]) if own_checked else None
        summary["own"]["finished"] = _mean([float(r["own_finish_reason"] == "eos") for r in records])
    if records and "mean_lambda" in records[0]:
        summary["realigned"]["mean_lambda"] = _mean([r.get("mean_lambda") for r in records])
    summary["settings"] = _sample_settings(config)
    return summary


def realign_dataset(model, tokenizer, dataset, config: RealignConfig, *, checker: Callable | str | None = "config",
                    state=None, progress: bool = True, model_fingerprint: str | None = None) -> dict | None:
    """Run the re-alignment of ``dataset`` into ``config.output_dir`` (resuming finished shards); returns the summary
    on the main process (None elsewhere).

    ``checker`` overrides ``config.checker`` with a callable ``(response, gold, example) -> bool`` (or None to skip the
    answer check). ``state`` is an `accelerate.PartialState` for data-parallel runs (default: a fresh one).
    ``model_fingerprint`` is the fingerprint of the weights (default: computed from ``model``'s state dict).

    ``output_dir/manifest.json`` records what produced the shards (the data's content, the weights, every setting
    that changes a sample) and is written only after every input has been checked; a re-run whose fingerprint
    differs is refused with a message saying what changed, so shards of two configurations are never mixed."""
    from tqdm.auto import tqdm

    from trl_onpolicy.utils import fingerprint as fp
    from trl_onpolicy.utils.validation import check_output_path

    if config.output_dir is None:
        raise ValueError("RealignConfig.output_dir is required: the folder to write shards and the dataset to.")
    if state is None:
        state = process_state()
    # every check first: nothing is written before the inputs are known to be good
    checker = resolve_checker(config.checker) if checker == "config" else resolve_checker(checker)
    _check_columns(dataset, config)
    if config.max_samples is not None:
        dataset = dataset.select(range(min(config.max_samples, len(dataset))))
    n = len(dataset)
    if n == 0:
        raise ValueError(f"The dataset {config.dataset_name!r} (split {config.dataset_split!r}) is empty.")
    from trl_onpolicy.utils.validation import check_nonempty_column, looks_like_local_path

    check_nonempty_column(dataset, config.reference_column, f"realign dataset {config.dataset_name!r}")
    check_output_path(config.output_dir, "RealignConfig.output_dir",
                            inputs=[x for x in (config.dataset_name, config.model_name_or_path)
                                    if x and looks_like_local_path(str(x))])
    out = Path(config.output_dir)
    num_shards = math.ceil(n / config.shard_size)
    settings = {k: v for k, v in _sample_settings(config).items() if k not in ("model_name_or_path", "dataset_name")}
    record = {"data": fp.data_fingerprint(dataset), "model": model_fingerprint or fp.model_fingerprint(model),
              "settings": fp.settings_fingerprint(settings)}
    manifest = {"num_samples": n, "num_shards": num_shards, "fingerprint": record, "settings": _sample_settings(config)}
    manifest_path = out / "manifest.json"
    # every process reads the manifest before any writes it, so a refusal stops every rank (none waits forever at
    # the barrier below); the main process writes it for a fresh output_dir
    state.wait_for_everyone()
    problem = None
    if manifest_path.exists():
        try:
            previous = json.loads(manifest_path.read_text())
        except ValueError:
            previous = {}
        changed = fp.changed_keys(previous.get("fingerprint"), record)
        if changed:
            old_settings = previous.get("settings") or {}
            which = [k for k in settings if old_settings.get(k) != settings[k]]
            detail = f" (changed settings: {', '.join(which)})" if "settings" in changed and which else ""
            problem = fp.stale_message(
                f"{out} (shards and manifest.json)", changed,
                f"resume with the same model, data and settings{detail}, or start fresh with a new output_dir (or "
                f"delete {out}).",
            )
    elif any(out.glob("shards/shard-*.jsonl")):
        problem = (f"{out} holds shards but no manifest.json saying what produced them; choose a new output_dir or "
                   f"delete {out}.")
    state.wait_for_everyone()
    if problem is not None:
        raise ValueError(problem)
    work_started()  # every input checked: a later error is a failed run (traceback, exit 1), not bad input
    if state.is_main_process and not manifest_path.exists():
        atomic_write_text(manifest_path, json.dumps(manifest, indent=2))
    state.wait_for_everyone()

    mine = [s for s in range(num_shards) if s % state.num_processes == state.process_index]
    pending = [s for s in mine if not _shard_path(out, s).exists()]
    total = sum(min(config.shard_size, n - s * config.shard_size) for s in mine)
    done = total - sum(min(config.shard_size, n - s * config.shard_size) for s in pending)
    bar = tqdm(total=total, initial=done, desc=f"realign (rank {state.process_index})", unit="sample",
               disable=not progress or not state.is_local_main_process)
    for s in pending:
        lo, hi = s * config.shard_size, min(n, (s + 1) * config.shard_size)
        rows = [dataset[i] for i in range(lo, hi)]
        records = realign_shard(model, tokenizer, rows, list(range(lo, hi)), config, s, checker, progress=bar)
        atomic_write_text(_shard_path(out, s), "".join(json.dumps(r) + "\n" for r in records))
    bar.close()
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    return merge_shards(config, n, num_shards)


def merge_shards(config: RealignConfig, num_samples: int, num_shards: int) -> dict:
    """Check that the shards cover every sample exactly once, then write train.jsonl and summary.json."""
    out = Path(config.output_dir)
    records = []
    for s in range(num_shards):
        path = _shard_path(out, s)
        if not path.exists():
            raise RuntimeError(f"Shard {path} is missing: re-run the same command to finish it.")
        records += [json.loads(line) for line in path.read_text().splitlines() if line]
    records.sort(key=lambda r: r["index"])
    if [r["index"] for r in records] != list(range(num_samples)):
        raise RuntimeError(f"The shards in {out} do not cover samples 0..{num_samples - 1} exactly once.")
    atomic_write_text(out / "train.jsonl", "".join(json.dumps(r) + "\n" for r in records if r["keep"]))
    summary = summarize(records, config)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    return summary


def run_realign(config: RealignConfig) -> dict | None:
    """Load the model and dataset named by ``config`` and re-align (data-parallel under torchrun/accelerate)."""
    for name in ("model_name_or_path", "dataset_name", "output_dir"):
        if getattr(config, name) is None:
            raise ValueError(f"realign needs `{name}` (in the recipe or as --{name}).")
    from trl_onpolicy.utils.fingerprint import model_fingerprint
    from trl_onpolicy.utils.models import resolve_model_path
    from trl_onpolicy.utils.validation import check_output_path, looks_like_local_path

    check_output_path(config.output_dir, "RealignConfig.output_dir",
                      inputs=[x for x in (config.dataset_name, config.model_name_or_path) if looks_like_local_path(str(x))])
    resolve_checker(config.checker)  # an unknown checker: before the model is loaded
    state = process_state()
    dataset = load_dataset_any(config.dataset_name, config.dataset_config, config.dataset_split)
    _check_columns(dataset, config)
    model, tokenizer = load_model(config.model_name_or_path, config.dtype, device=state.device)
    path = resolve_model_path(config.model_name_or_path)
    weights = model_fingerprint(path) if Path(path).is_dir() else None
    return realign_dataset(model, tokenizer, dataset, config, state=state, model_fingerprint=weights)


def main(argv: list[str] | None = None) -> int:
    from trl import TrlParser

    parser = TrlParser((RealignConfig,), prog="trl-onpolicy realign",
                       description="Re-align a (question, reference) corpus to a model with Hinted Decoding.")
    (config,) = parser.parse_args_and_config(argv)
    summary = run_realign(config)
    if summary is not None:
        print(json.dumps({k: v for k, v in summary.items() if k != "settings"}, indent=2))
        print(f"Wrote {Path(config.output_dir) / 'train.jsonl'} ({summary['num_kept']} of {summary['num_samples']} kept).")
    end_processes()
    return 0


__all__ = [
    "RealignConfig", "Acceptance", "accept_response", "completion_text", "realign_dataset", "run_realign", "response_statistics", "resolve_checker", "build_hinted_prompt_ids", "hinted_messages", "plain_prompt",
    "load_dataset_any", "merge_shards", "main",
]
