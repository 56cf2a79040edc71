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

import json
import math
import os
import pickle
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import ddt, distributed

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
            Rows per checkpointed chunk: finished chunks are kept in `output_dir/.ddt_cache` and a rerun of the same
            command resumes after them (the cache is discarded when the arguments differ).
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
        for name in ("batch_size", "top_k_tokens", "max_new_tokens", "resume_chunk_rows"):
            value = getattr(self, name)
            if value < (0 if name == "top_k_tokens" else 1):
                raise ValueError(f"`{name}` must be positive, got {value}.")
        for name in ("max_length", "num_samples", "max_tokens_per_batch", "vocab_chunk", "token_chunk", "generation_batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"`{name}` must be a positive integer or None, got {value}.")
        if self.self_temperature <= 0:
            raise ValueError(f"`self_temperature` must be > 0, got {self.self_temperature}.")


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


# ----------------------------------------------------------------------------------------------------------------
# loading


def load_dataset_any(name: str, config: str | None = None, split: str = "train"):
    """A `datasets.Dataset` from a local file (json/jsonl/parquet/csv/arrow), a `save_to_disk` folder, a data
    folder, ``reasoning-gym:TASK[:N]`` (offline math problems), or a Hub name (`trl_onpolicy.data.load_sft_dataset`)."""
    from .data import load_sft_dataset

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
    """``(model, tokenizer)`` from TRL's `ModelConfig` fields (`trl_onpolicy.models.load_model`)."""
    from .models import load_model as load

    return load(
        model_args.model_name_or_path,
        model_args.dtype,
        device,
        revision=getattr(model_args, "model_revision", None),
        attn_implementation=getattr(model_args, "attn_implementation", None),
    )


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


def _cache_meta(args: DDTArguments, script_args, model_args, num_rows: int) -> dict:
    keys = ("max_length", "dataset_text_field", "compare_self_samples", "max_new_tokens", "self_temperature", "seed",
            "resume_chunk_rows", "top_k_tokens")
    meta = {k: getattr(args, k) for k in keys}
    meta.update(model=str(model_args.model_name_or_path), dtype=str(model_args.dtype), dataset=str(script_args.dataset_name),
                config=script_args.dataset_config, split=script_args.dataset_train_split, num_rows=num_rows)
    return meta


def _open_cache(out: Path, meta: dict) -> Path:
    """``out/.ddt_cache``, emptied when it was written for different arguments."""
    cache = out / ".ddt_cache"
    if distributed.is_main_process():
        meta_file = cache / "meta.json"
        if cache.exists() and (not meta_file.exists() or json.loads(meta_file.read_text()) != ddt._json_safe(meta)):
            print(f"[ddt] {cache} holds results of other arguments: starting afresh")
            shutil.rmtree(cache)
        cache.mkdir(parents=True, exist_ok=True)
        meta_file.write_text(json.dumps(ddt._json_safe(meta), indent=2))
    distributed.barrier()
    return cache


def _chunked(cache: Path, name: str, num_rows: int, chunk_rows: int, compute) -> list:
    """Concatenated ``compute(start, end)`` over row chunks; each finished chunk is pickled under ``cache`` so that an
    interrupted run resumes after the last finished chunk.

    Under several processes ``compute`` is collective (every rank scores a share and gathers), so every rank must
    skip the same chunks: the finished ones are listed once, behind a barrier, before anything new is written."""
    distributed.barrier()
    paths = [cache / f"{name}-{k:05d}.pkl" for k in range(math.ceil(num_rows / chunk_rows))]
    finished = [p.exists() for p in paths]
    distributed.barrier()
    out = []
    for k, (path, done) in enumerate(zip(paths, finished)):
        if done:
            with open(path, "rb") as f:
                out.extend(pickle.load(f))
            continue
        start = k * chunk_rows
        part = compute(k, start, min(num_rows, start + chunk_rows))
        if distributed.is_main_process():
            tmp = path.with_suffix(f".{os.getpid()}.tmp")  # a name of its own: never shared with another writer
            with open(tmp, "wb") as f:
                pickle.dump(part, f)
            os.replace(tmp, path)
        out.extend(part)
    return out


def run_ddt(args: DDTArguments, script_args, model_args, model=None, tokenizer=None) -> dict:
    """Library form of `trl-onpolicy ddt`: returns the summary that it writes to ``output_dir/summary.json``.

    Rows are processed in chunks of ``resume_chunk_rows``; finished chunks are kept in ``output_dir/.ddt_cache``, so
    running the same command again after an interruption continues where it stopped."""
    dataset = load_dataset_any(script_args.dataset_name, script_args.dataset_config, script_args.dataset_train_split)
    if args.num_samples is not None:
        dataset = dataset.select(range(min(args.num_samples, len(dataset))))
    if model is None:
        model, tokenizer = load_model(model_args, _device(args.device))
    out = Path(args.output_dir)
    cache = _open_cache(out, _cache_meta(args, script_args, model_args, len(dataset)))
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
        (out / "summary.json").write_text(json.dumps(ddt._json_safe(summary), indent=2) + "\n")
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
    dataset = load_dataset_any(script_args.dataset_name, script_args.dataset_config, script_args.dataset_train_split)
    if args.scores_file:
        with open(args.scores_file) as f:
            samples = [json.loads(line) for line in f if line.strip()]
    else:
        if model is None:
            model, tokenizer = load_model(model_args, _device(args.device))
        samples = _score(model, tokenizer, dataset, args, "DDT scoring").samples
    filtered, report = ddt.filter_dataset(
        dataset, samples, by=args.filter_by, min_value=args.min_value, max_value=args.max_value,
        invert=args.invert, keep_unscored=args.keep_unscored,
    )
    if args.output_path:
        target = Path(args.output_path)
    else:
        source = Path(script_args.dataset_name)
        suffix = source.suffix.lower() if source.is_file() and source.suffix.lower() in FILE_BUILDERS else ""
        target = Path(args.output_dir) / f"filtered{suffix}"
    report["output_path"] = str(target)
    if distributed.is_main_process():
        save_dataset_like(filtered, target)
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(args.output_dir) / "filter_report.json").write_text(json.dumps(ddt._json_safe(report), indent=2) + "\n")
        bounds = f"[{args.min_value}, {args.max_value}]"
        print(f"ddt-filter: {report['kept']} kept, {report['dropped']} dropped ({report['dropped_unscored']} unscored) "
              f"of {report['num_rows']} rows by {args.filter_by} {'outside' if args.invert else 'in'} {bounds}; "
              f"wrote {target}")
    return report


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
