"""`trl-onpolicy ddt` (score a dataset) and `trl-onpolicy ddt-filter` (keep/drop rows by their DDT statistics).

Both parse with TRL's `TrlParser`, so ``--config recipe.yaml`` works and command-line flags override it, and use
TRL's argument names (``--model_name_or_path``, ``--dataset_name``, ``--output_dir``, ``--dtype``, ...).

    trl-onpolicy ddt --model_name_or_path embedded:smollm2-135m-instruct --dataset_name data.jsonl \\
        --output_dir ddt_out --compare_self_samples --max_new_tokens 128
    trl-onpolicy ddt-filter --dataset_name data.jsonl --scores_file ddt_out/samples.jsonl \\
        --filter_by mean_phi --min_value -0.5 --output_dir filtered

Under ``torchrun --nproc_per_node N`` (or ``accelerate launch``) rows are split across the processes; process 0
writes the outputs.
"""

from __future__ import annotations

import io
import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from trl_onpolicy import ddt
from trl_onpolicy.utils import distributed
from trl_onpolicy.utils.errors import work_started
from trl_onpolicy.utils.fingerprint import changed_keys, data_fingerprint, model_fingerprint
from trl_onpolicy.utils.validation import COUNT, OPTIONAL_COUNT, POSITIVE, Range, check_fields, check_output_path
from trl_onpolicy.utils.io import atomic_write_bytes, atomic_write_text, write_json_atomic

FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}


@dataclass
class DDTArguments:
    """Arguments of `trl-onpolicy ddt` (model and dataset arguments come from TRL's ModelConfig/ScriptArguments).

    Parameters:
        output_dir (`str`):
            Folder for `summary.json`, `samples.jsonl` (one record per row, in dataset order) and `phi.png`.
        max_length (`int` or `None`, *optional*, defaults to `1024`):
            Rows whose prompt + completion is longer (in tokens) are skipped and counted as `too_long`, not
            truncated (a truncated completion would be scored on a different text).
        batch_size (`int`, *optional*, defaults to `8`):
            Rows per forward pass (rows are sorted by length first).
        max_tokens_per_batch (`int` or `None`, *optional*, defaults to `None`):
            Also cap a batch's padded size (rows x longest row) at this many tokens.
        num_samples (`int` or `None`, *optional*, defaults to `None`):
            Score only the first N rows.
        top_k_tokens (`int`, *optional*, defaults to `5`):
            Worst tokens (lowest phi) listed per sample in `samples.jsonl`.
        dataset_text_field (`str`, *optional*, defaults to `"text"`):
            Column of language-modeling datasets (as SFTConfig.dataset_text_field).
        compare_self_samples (`bool`, *optional*, defaults to `False`):
            Also sample the model's own responses to the same prompts (temperature `self_temperature`, no top-k or
            top-p) and score them: `summary.json` gets a `self_samples` section and the plot both distributions.
        generation_batch_size (`int` or `None`, *optional*, defaults to `None`):
            Prompts per `generate` call for the own responses (default: `batch_size`). Decoding is memory-bound, so
            a larger batch is almost free per step.
        max_new_tokens (`int`, *optional*, defaults to `256`):
            Length limit of the model's own responses.
        self_temperature (`float`, *optional*, defaults to `1.0`):
            Sampling temperature of the own responses (1.0 is the model's distribution, where E[phi] = 0).
        seed (`int`, *optional*, defaults to `0`):
            Seed of the own-response sampling.
        device (`str` or `None`, *optional*, defaults to `None`):
            `cpu`, `cuda`, `cuda:1`, ...; default: the process's accelerator device (CUDA if available).
        vocab_chunk (`int` or `None`, *optional*, defaults to `None`):
            Vocabulary tile of the LM head statistics (memory ~ a few token_chunk x vocab_chunk floats); default
            2048 on CPU, 16384 on GPU.
        token_chunk (`int` or `None`, *optional*, defaults to `None`):
            Token tile of the LM head statistics; default 512 on CPU, 4096 on GPU.
        no_progress (`bool`, *optional*, defaults to `False`):
            Hide the progress bars.
        resume_chunk_rows (`int`, *optional*, defaults to `1024`):
            Rows per checkpointed chunk: finished chunks are kept in `output_dir/.ddt_cache` (NumPy `.npz`, read
            without pickle) and a rerun resumes after them. The cache records a fingerprint of the data's content,
            the model's weights and the settings; when any differs it is discarded and everything is recomputed.
    """

    output_dir: str = field(metadata={"help": "Folder for summary.json, samples.jsonl and phi.png."})
    max_length: int | None = field(default=1024, metadata={"help": "Skip (and count) rows longer than this."})
    batch_size: int = field(default=8, metadata={"help": "Rows per forward pass."})
    max_tokens_per_batch: int | None = field(default=None, metadata={"help": "Cap on padded tokens per batch."})
    num_samples: int | None = field(default=None, metadata={"help": "Score only the first N rows."})
    top_k_tokens: int = field(default=5, metadata={"help": "Worst tokens listed per sample."})
    dataset_text_field: str = field(default="text", metadata={"help": "Text column of language-modeling data."})
    compare_self_samples: bool = field(default=False, metadata={"help": "Also score the model's own responses."})
    generation_batch_size: int | None = field(default=None, metadata={"help": "Prompts per generate call (default batch_size)."})
    max_new_tokens: int = field(default=256, metadata={"help": "Length limit of the own responses."})
    self_temperature: float = field(default=1.0, metadata={"help": "Temperature of the own responses."})
    seed: int = field(default=0, metadata={"help": "Seed of the own-response sampling."})
    device: str | None = field(default=None, metadata={"help": "cpu / cuda / cuda:N (default: automatic)."})
    vocab_chunk: int | None = field(default=None, metadata={"help": "Vocabulary tile size (default: 2048 CPU, 16384 GPU)."})
    token_chunk: int | None = field(default=None, metadata={"help": "Token tile size (default: 512 CPU, 4096 GPU)."})
    no_progress: bool = field(default=False, metadata={"help": "Hide progress bars."})
    resume_chunk_rows: int = field(default=1024, metadata={"help": "Rows per checkpointed (resumable) chunk."})

    def __post_init__(self):
        check_fields(self, DDT_RULES, owner="ddt-filter" if isinstance(self, DDTFilterArguments) else "ddt")


# numeric arguments of `ddt` and `ddt-filter` (NaN and inf are refused: a NaN temperature silently meant greedy)
DDT_RULES = {
    "max_length": OPTIONAL_COUNT, "batch_size": COUNT, "max_tokens_per_batch": OPTIONAL_COUNT,
    "num_samples": OPTIONAL_COUNT, "top_k_tokens": Range(lo=0, integer=True), "generation_batch_size": OPTIONAL_COUNT,
    "max_new_tokens": COUNT, "self_temperature": POSITIVE, "seed": Range(integer=True), "vocab_chunk": OPTIONAL_COUNT,
    "token_chunk": OPTIONAL_COUNT, "resume_chunk_rows": COUNT,
    "min_value": Range(optional=True), "max_value": Range(optional=True),
}


@dataclass
class DDTFilterArguments(DDTArguments):
    """Arguments of `trl-onpolicy ddt-filter`: those of `ddt` (used when scoring on the fly) plus the filter.

    Parameters:
        scores_file (`str` or `None`, *optional*, defaults to `None`):
            `samples.jsonl` written by `trl-onpolicy ddt` for the same dataset. Without it the dataset is scored
            with `--model_name_or_path` first.
        filter_by (`str`, *optional*, defaults to `"mean_phi"`):
            Per-sample statistic: mean_phi, z, sum_phi, num_tokens, frac_phi_gt_-1, frac_phi_gt_-3, frac_phi_gt_-5.
        min_value (`float` or `None`), max_value (`float` or `None`):
            Keep rows whose statistic lies in [min_value, max_value] (either bound may be left open).
        invert (`bool`, *optional*, defaults to `False`):
            Drop those rows instead and keep the rest.
        keep_unscored (`bool`, *optional*, defaults to `False`):
            Keep rows that could not be scored (skipped); by default they are dropped and counted.
        output_path (`str` or `None`, *optional*, defaults to `None`):
            Where to write the filtered dataset; by default `output_dir/filtered` in the input's format (same file
            extension for a json/jsonl/parquet/csv input, a `save_to_disk` folder otherwise). An output path
            ending in .jsonl/.json/.parquet/.csv picks that format.
    """

    scores_file: str | None = field(default=None, metadata={"help": "samples.jsonl of a previous `ddt` run."})
    filter_by: str = field(default="mean_phi", metadata={"help": f"One of {ddt.FILTER_STATISTICS}."})
    min_value: float | None = field(default=None, metadata={"help": "Keep rows with statistic >= this."})
    max_value: float | None = field(default=None, metadata={"help": "Keep rows with statistic <= this."})
    invert: bool = field(default=False, metadata={"help": "Drop the selected rows instead of keeping them."})
    keep_unscored: bool = field(default=False, metadata={"help": "Keep rows that could not be scored."})
    output_path: str | None = field(default=None, metadata={"help": "Filtered dataset path (default output_dir/filtered)."})

    def __post_init__(self):
        super().__post_init__()
        if self.filter_by not in ddt.FILTER_STATISTICS:
            raise ValueError(f"`filter_by` must be one of {ddt.FILTER_STATISTICS}, got {self.filter_by!r}.")
        if self.min_value is None and self.max_value is None:
            raise ValueError("Give `--min_value` and/or `--max_value`.")
        if self.min_value is not None and self.max_value is not None and self.min_value > self.max_value:
            raise ValueError(f"ddt-filter.min_value={self.min_value!r} is invalid: it exceeds max_value={self.max_value!r}.")


# ----------------------------------------------------------------------------------------------------------------
# loading


def load_dataset_any(name: str, config: str | None = None, split: str = "train"):
    """A `datasets.Dataset` from a local file (json/jsonl/parquet/csv/arrow), a `save_to_disk` folder, a data
    folder, ``reasoning-gym:TASK[:N]`` (offline math problems), or a Hub name (`trl_onpolicy.data.datasets.load_sft_dataset`)."""
    from trl_onpolicy.data.datasets import load_sft_dataset

    return load_sft_dataset(name, split, **({"name": config} if config else {}))


def save_dataset_like(dataset, path: str | Path) -> Path:
    """Write ``dataset`` to ``path`` in the format its extension names, else as a `save_to_disk` folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower()
    if suffix in (".json", ".jsonl"):
        dataset.to_json(str(path), lines=True, force_ascii=False)
    elif suffix == ".parquet":
        dataset.to_parquet(str(path))
    elif suffix == ".csv":
        dataset.to_csv(str(path), index=False)
    else:
        dataset.save_to_disk(str(path))
    return path


def _device(requested: str | None) -> torch.device:
    if requested:
        return torch.device(requested)
    return distributed.process_state().device


def load_model(model_args, device: torch.device):
    """``(model, tokenizer)`` from TRL's `ModelConfig` fields (`trl_onpolicy.utils.models.load_model`)."""
    from trl_onpolicy.utils.models import load_model as load

    return load(
        model_args.model_name_or_path,
        model_args.dtype,
        device,
        revision=getattr(model_args, "model_revision", None),
        attn_implementation=getattr(model_args, "attn_implementation", None),
    )


def _local_inputs(script_args, model_args, *extra) -> list[str]:
    """The local paths a job reads (dataset, model folder, ...): an output must not overwrite any of them."""
    from trl_onpolicy.utils.validation import looks_like_local_path

    names = [script_args.dataset_name, getattr(model_args, "model_name_or_path", None), *extra]
    return [str(n) for n in names if n and looks_like_local_path(str(n))]


def _parse(dataclass_type, argv):
    from trl import ModelConfig, ScriptArguments, TrlParser

    parser = TrlParser((dataclass_type, ScriptArguments, ModelConfig))
    return parser.parse_args_and_config(args=argv)


# ----------------------------------------------------------------------------------------------------------------
# commands


def _score(model, tokenizer, dataset, args: DDTArguments, desc: str) -> ddt.DDTResult:
    return ddt.score_dataset(
        model, tokenizer, dataset,
        max_length=args.max_length, batch_size=args.batch_size, max_tokens_per_batch=args.max_tokens_per_batch,
        top_k_tokens=args.top_k_tokens, dataset_text_field=args.dataset_text_field,
        vocab_chunk=args.vocab_chunk, token_chunk=args.token_chunk, progress=not args.no_progress, desc=desc,
    )


# settings that change the cached chunks (model and data enter by content, in `_cache_fingerprint`)
_CACHE_SETTINGS = ("max_length", "dataset_text_field", "compare_self_samples", "max_new_tokens", "self_temperature",
                   "seed", "resume_chunk_rows", "top_k_tokens")


def _cache_fingerprint(args: DDTArguments, model_args, dataset, model, model_path: str | None) -> dict:
    """What produced the cached chunks: the data's content, the model's weights (the weight files of the folder it
    was loaded from, else its state dict) and every setting that changes a chunk."""
    weights = model_fingerprint(model_path) if model_path and Path(model_path).is_dir() else model_fingerprint(model)
    settings = {k: getattr(args, k) for k in _CACHE_SETTINGS}
    settings.update(dtype=str(model_args.dtype), num_rows=len(dataset))
    return {"data": data_fingerprint(dataset), "model": weights, "settings": ddt.json_safe(settings)}


def _open_cache(out: Path, fingerprint: dict) -> Path:
    """``out/.ddt_cache``, emptied (and recomputed) when its chunks were made from other data, weights or settings."""
    cache = out / ".ddt_cache"
    if distributed.is_main_process():
        meta_file = cache / "fingerprint.json"
        if cache.exists():
            try:
                old = json.loads(meta_file.read_text())
            except (OSError, ValueError):
                old = None
            changed = changed_keys(old, fingerprint)
            if changed:
                what = "an unreadable or older cache" if old is None else f"a different {', '.join(changed)}"
                print(f"[ddt] {cache} holds chunks of {what}: recomputing from scratch.", flush=True)
                shutil.rmtree(cache)
        cache.mkdir(parents=True, exist_ok=True)
        write_json_atomic(meta_file, fingerprint)
    distributed.barrier()
    return cache


def _encode_chunk(part) -> bytes:
    """A chunk as an ``.npz`` archive without pickle: the NumPy arrays as arrays, everything else as one JSON
    document (arrays replaced by ``{"__array__": key}``)."""
    arrays: dict[str, np.ndarray] = {}

    def strip(obj):
        if isinstance(obj, np.ndarray):
            key = f"a{len(arrays)}"
            arrays[key] = obj
            return {"__array__": key}
        if isinstance(obj, dict):
            return {k: strip(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [strip(v) for v in obj]
        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, float) and not math.isfinite(obj):
            return {"__float__": repr(obj)}
        return obj

    doc = json.dumps(strip(part))
    buffer = io.BytesIO()
    np.savez(buffer, __json__=np.frombuffer(doc.encode(), dtype=np.uint8), **arrays)
    return buffer.getvalue()


def _decode_chunk(path: Path) -> list:
    """Read a chunk written by `_encode_chunk` (``allow_pickle=False``: a planted file cannot run code)."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            doc = json.loads(archive["__json__"].tobytes().decode())
            arrays = {k: archive[k] for k in archive.files if k != "__json__"}
    except (ValueError, OSError, KeyError, EOFError) as err:
        raise ValueError(f"DDT cache chunk {path} is unreadable ({type(err).__name__}: {err}); delete {path.parent} "
                         "to recompute it.") from None

    def restore(obj):
        if isinstance(obj, dict):
            if set(obj) == {"__array__"}:
                return arrays[obj["__array__"]]
            if set(obj) == {"__float__"}:
                return float(obj["__float__"])
            return {k: restore(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [restore(v) for v in obj]
        return obj

    return restore(doc)


def _chunked(cache: Path, name: str, num_rows: int, chunk_rows: int, compute) -> list:
    """Concatenated ``compute(start, end)`` over row chunks; each finished chunk is saved under ``cache`` (an
    ``.npz`` read back without pickle) so that an interrupted run resumes after the last finished chunk.

    Under several processes ``compute`` is collective (every rank scores a share and gathers), so every rank must
    skip the same chunks: the finished ones are listed once, behind a barrier, before anything new is written."""
    distributed.barrier()
    paths = [cache / f"{name}-{k:05d}.npz" for k in range(math.ceil(num_rows / chunk_rows))]
    finished = [p.exists() for p in paths]
    distributed.barrier()
    out = []
    for k, (path, done) in enumerate(zip(paths, finished)):
        if done:
            out.extend(_decode_chunk(path))
            continue
        start = k * chunk_rows
        part = compute(k, start, min(num_rows, start + chunk_rows))
        if distributed.is_main_process():
            atomic_write_bytes(path, _encode_chunk(part))
        out.extend(part)
    return out


def run_ddt(args: DDTArguments, script_args, model_args, model=None, tokenizer=None) -> dict:
    """Library form of `trl-onpolicy ddt`: returns the summary that it writes to ``output_dir/summary.json``.

    Rows are processed in chunks of ``resume_chunk_rows``; finished chunks are kept in ``output_dir/.ddt_cache``, so
    running the same command again after an interruption continues where it stopped."""
    out = check_output_path(args.output_dir, "ddt output_dir", inputs=_local_inputs(script_args, model_args))
    dataset = load_dataset_any(script_args.dataset_name, script_args.dataset_config, script_args.dataset_train_split)
    if args.num_samples is not None:
        dataset = dataset.select(range(min(args.num_samples, len(dataset))))
    if len(dataset) == 0:
        raise ValueError(f"dataset {script_args.dataset_name!r} (split {script_args.dataset_train_split!r}) has no rows.")
    model_path = None
    if model is None:
        model, tokenizer = load_model(model_args, _device(args.device))
        from trl_onpolicy.utils.models import resolve_model_path

        model_path = resolve_model_path(str(model_args.model_name_or_path))
    # every row too long or empty: one error line now, not an empty summary (and a failed plot) after the scoring
    ddt.check_some_row_scores(model, tokenizer, dataset, max_length=args.max_length,
                              dataset_text_field=args.dataset_text_field)
    fingerprint = _cache_fingerprint(args, model_args, dataset, model, model_path)
    cache = _open_cache(out, fingerprint)
    work_started()  # input and model checked: a later error is a failed run (traceback, exit 1), not bad input
    n_chunks = math.ceil(len(dataset) / args.resume_chunk_rows)

    def score_chunk(k, start, end):
        res = _score(model, tokenizer, dataset.select(range(start, end)), args, f"DDT scoring corpus [{k + 1}/{n_chunks}]")
        return [(r | {"index": r["index"] + start}, a) for r, a in zip(res.samples, res.tokens)]

    parts = _chunked(cache, "corpus", len(dataset), args.resume_chunk_rows, score_chunk)
    result = ddt.DDTResult(summary={}, samples=[r for r, _ in parts], tokens=[a for _, a in parts])
    result.summary = ddt.corpus_summary(result.tokens, result.samples)
    summary = dict(result.summary)
    summary["model"] = model_args.model_name_or_path
    summary["dataset"] = script_args.dataset_name
    summary["max_length"] = args.max_length
    summary["num_processes"] = distributed.num_processes()
    summary["fingerprint"] = fingerprint
    own = None
    if args.compare_self_samples:
        def generate_chunk(k, start, end):
            gen = ddt.sample_own_responses(
                model, tokenizer, dataset.select(range(start, end)), max_new_tokens=args.max_new_tokens,
                batch_size=args.generation_batch_size or args.batch_size, temperature=args.self_temperature,
                seed=args.seed + k, dataset_text_field=args.dataset_text_field, progress=not args.no_progress,
            )
            return [g | {"index": g["index"] + start} for g in gen]

        generated = _chunked(cache, "own", len(dataset), args.resume_chunk_rows, generate_chunk)
        gen_rows = [{"prompt_ids": g["prompt_ids"], "completion_ids": g["completion_ids"]} for g in generated]
        own = ddt.score_dataset(
            model, tokenizer, gen_rows, max_length=None, batch_size=args.batch_size,
            top_k_tokens=args.top_k_tokens, vocab_chunk=args.vocab_chunk, token_chunk=args.token_chunk,
            progress=not args.no_progress, desc="DDT scoring own samples",
        )
        own_summary = dict(own.summary)
        own_summary["temperature"] = args.self_temperature
        own_summary["max_new_tokens"] = args.max_new_tokens
        eos = model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos]) | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())
        own_summary["frac_finished"] = (
            sum(1 for g in generated if g["completion_ids"] and g["completion_ids"][-1] in eos) / len(generated) if generated else math.nan
        )
        summary["self_samples"] = own_summary
        for record, g in zip(own.samples, generated):
            record["index"] = g["index"]
            record["completion"] = tokenizer.decode(g["completion_ids"], skip_special_tokens=True)

    if distributed.is_main_process():
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "summary.json", json.dumps(ddt.json_safe(summary), indent=2) + "\n")
        result.write_samples(out / "samples.jsonl")
        if own is not None:
            own.write_samples(out / "self_samples.jsonl")
        ddt.plot_phi_distribution(out / "phi.png", result, own, title=f"DDT: {Path(str(model_args.model_name_or_path)).name}")
        _print_summary(summary, out)
    return summary


def _print_summary(summary: dict, out: Path) -> None:
    def line(name, s):
        fr = " ".join(f"{k[-2:]}:{s[k]:.3f}" for k in (ddt.frac_key(t) for t in ddt.THRESHOLDS))
        return (f"{name:<13} samples={s['num_samples']:<6} tokens={s['num_tokens']:<8} mean_phi={s['mean_phi']:+.4f} "
                f"std_phi={s['std_phi']:.3f} mean_z={s['mean_z']:+.2f} frac_phi_gt {fr}")

    print(line("corpus", summary))
    if summary["skipped"]:
        print(f"skipped rows: {summary['skipped']}  (reasons: {ddt.SKIP_REASONS})")
    if "self_samples" in summary:
        print(line("own samples", summary["self_samples"]))
    print(f"wrote {out / 'summary.json'}, {out / 'samples.jsonl'}, {out / 'phi.png'}")


def main(argv: list[str] | None = None) -> int:
    args, script_args, model_args = _parse(DDTArguments, argv)
    if not script_args.dataset_name:
        raise ValueError("Pass --dataset_name (a local file or folder, or a Hub dataset name).")
    run_ddt(args, script_args, model_args)
    distributed.end_processes()
    return 0


def run_filter(args: DDTFilterArguments, script_args, model_args, model=None, tokenizer=None) -> dict:
    """Library form of `trl-onpolicy ddt-filter`: returns the report it writes to ``output_dir/filter_report.json``."""
    if args.output_path:
        target = Path(args.output_path)
    else:
        source = Path(script_args.dataset_name)
        suffix = source.suffix.lower() if source.is_file() and source.suffix.lower() in FILE_BUILDERS else ""
        target = Path(args.output_dir) / f"filtered{suffix}"
    # never overwrite what is read: the dataset (14 of 16 rows were lost when output_path was the input), the scores
    inputs = _local_inputs(script_args, model_args, args.scores_file)
    check_output_path(target, "ddt-filter output_path", inputs=inputs, is_dir=target.suffix.lower() not in FILE_BUILDERS)
    check_output_path(args.output_dir, "ddt-filter output_dir", inputs=inputs)
    dataset = load_dataset_any(script_args.dataset_name, script_args.dataset_config, script_args.dataset_train_split)
    samples = read_scores_file(args.scores_file, args.filter_by) if args.scores_file else None
    if samples is not None:
        _check_scores_match_data(args.scores_file, dataset)
    if samples is None:
        if model is None:
            model, tokenizer = load_model(model_args, _device(args.device))
        work_started()  # input and model checked: a later error is a failed run (traceback, exit 1), not bad input
        samples = _score(model, tokenizer, dataset, args, "DDT scoring").samples
    filtered, report = ddt.filter_dataset(
        dataset, samples, by=args.filter_by, min_value=args.min_value, max_value=args.max_value,
        invert=args.invert, keep_unscored=args.keep_unscored,
    )
    report["output_path"] = str(target)
    if distributed.is_main_process():
        save_dataset_like(filtered, target)
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(args.output_dir) / "filter_report.json", json.dumps(ddt.json_safe(report), indent=2) + "\n")
        bounds = f"[{args.min_value}, {args.max_value}]"
        print(f"ddt-filter: {report['kept']} kept, {report['dropped']} dropped ({report['dropped_unscored']} unscored) "
              f"of {report['num_rows']} rows by {args.filter_by} {'outside' if args.invert else 'in'} {bounds}; "
              f"wrote {target}")
    return report


def _check_scores_match_data(scores_file, dataset) -> None:
    """When the `ddt` run that wrote ``scores_file`` left its summary.json beside it, its data fingerprint must be
    that of ``dataset``: scores of other rows (same count, other content) would filter the wrong rows."""
    summary_file = Path(scores_file).with_name("summary.json")
    try:
        recorded = json.loads(summary_file.read_text())["fingerprint"]["data"]
    except (OSError, ValueError, KeyError, TypeError):
        return  # an older run, or scores written elsewhere: the row count is still checked
    if recorded != data_fingerprint(dataset):
        raise ValueError(
            f"scores_file {str(scores_file)!r} scores different data than this dataset (the data fingerprint in "
            f"{summary_file} differs: another dataset, or this one changed since `trl-onpolicy ddt` ran); run "
            "`trl-onpolicy ddt` on this dataset again."
        )


def read_scores_file(path, filter_by: str) -> list[dict]:
    """The per-row records of a ``samples.jsonl`` written by `trl-onpolicy ddt`, checked: every line a JSON object
    with an integer ``index`` (the error names the file and line)."""
    from trl_onpolicy.utils.validation import check_input_path, check_text_file

    check_input_path(path, "scores_file", must_be_dir=False)
    if Path(path).suffix.lower() not in (".jsonl", ".json"):
        raise ValueError(f"scores_file {str(path)!r} is not a .jsonl file; pass the samples.jsonl written by `trl-onpolicy ddt`.")
    check_text_file(path, "scores_file")
    samples = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as err:
                raise ValueError(f"scores_file {str(path)!r}, line {number}: not JSON ({err.msg}).") from None
            if not isinstance(record, dict) or not isinstance(record.get("index"), int):
                raise ValueError(
                    f"scores_file {str(path)!r}, line {number}: no integer `index`; pass the samples.jsonl written by "
                    "`trl-onpolicy ddt` (not summary.json or the dataset itself)."
                )
            if filter_by not in record and not record.get("skipped"):
                raise ValueError(f"scores_file {str(path)!r}, line {number}: no `{filter_by}` statistic to filter by.")
            samples.append(record)
    return samples


def filter_main(argv: list[str] | None = None) -> int:
    args, script_args, model_args = _parse(DDTFilterArguments, argv)
    if not script_args.dataset_name:
        raise ValueError("Pass --dataset_name (the dataset to filter).")
    if not args.scores_file and not model_args.model_name_or_path:
        raise ValueError("Pass --scores_file (samples.jsonl of `trl-onpolicy ddt`) or --model_name_or_path to score.")
    run_filter(args, script_args, model_args)
    distributed.end_processes()
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
