"""``trl-onpolicy eval``: evaluate a model on math benchmark sets (and retention sets) from the command line.

    trl-onpolicy eval --model_name_or_path embedded:smollm2-135m-instruct \\
        --sets in_domain=chain_sum:100 facts=facts:60 --output_dir runs/eval_base

A set spec string is ``name=task[:n[:seed]]`` or ``name=path/to/file.jsonl``; in a ``--config`` YAML, ``sets`` may
also hold mappings with every `EvalSet` field. The library is `trl_onpolicy.eval.evaluation`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from trl_onpolicy.eval.evaluation import EvalConfig, EvalSet, evaluate, format_metrics, load_eval_set
from trl_onpolicy.utils.errors import work_started
from trl_onpolicy.utils.models import load_model


@dataclass
class EvalArguments(EvalConfig):
    """Arguments of ``trl-onpolicy eval``: every `EvalConfig` field, and what to evaluate."""

    model_name_or_path: str = field(
        default="embedded:smollm2-135m-instruct", metadata={"help": "Model folder, Hub name or embedded alias."}
    )
    sets: list[str] = field(
        default_factory=lambda: ["in_domain=chain_sum:50", "facts=facts"],
        metadata={"help": "Evaluation sets: 'name=task[:n[:seed]]' or 'name=path/to/file.jsonl' (YAML: mappings too)."},
    )
    output_dir: str = field(default="runs/eval", metadata={"help": "Where metrics.json and per-set jsonl files go."})
    dtype: str = field(default="float32", metadata={"help": "Model dtype: float32, bfloat16 or float16."})
    num_threads: int | None = field(default=None, metadata={"help": "torch CPU threads (1 is often fastest on a shared CPU)."})


def main(argv: list[str] | None = None) -> int:
    from trl import TrlParser

    parser = TrlParser(EvalArguments, prog="trl-onpolicy eval",
                       description="Evaluate a model on math benchmark sets (and retention sets).")
    (args,) = parser.parse_args_and_config(argv)
    from trl_onpolicy.utils.fingerprint import model_fingerprint
    from trl_onpolicy.utils.models import resolve_model_path
    from trl_onpolicy.utils.validation import check_choice, check_output_path, looks_like_local_path

    check_choice("dtype", args.dtype, ("float32", "bfloat16", "float16", "auto"), "eval")
    sets = [EvalSet.from_spec(s) for s in args.sets]
    names = [s.name for s in sets]
    if len(set(names)) != len(names):
        raise ValueError(f"Evaluation set names must be unique; got {names}.")
    inputs = [args.model_name_or_path] + [s.path for s in sets if s.path]
    check_output_path(args.output_dir, "eval output_dir", inputs=[i for i in inputs if looks_like_local_path(str(i))])
    for s in sets:  # every set readable before the model is loaded
        if not load_eval_set(s):
            raise ValueError(f"Evaluation set {s.name!r} is empty.")
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    config = EvalConfig(**{f.name: getattr(args, f.name) for f in fields(EvalConfig)})
    model, tokenizer = load_model(args.model_name_or_path, args.dtype)  # on CUDA when available
    path = resolve_model_path(args.model_name_or_path)
    weights = model_fingerprint(path) if Path(path).is_dir() else None
    work_started()  # input and model checked: a later error is a failed run (traceback, exit 1), not bad input
    results = evaluate(model if args.backend == "hf" else args.model_name_or_path, tokenizer, sets, config, args.output_dir,
                       model_fingerprint=weights)
    print(format_metrics(results))
    print(f"per-sample outputs and metrics.json in {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
