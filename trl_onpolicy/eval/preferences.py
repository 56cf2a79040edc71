"""Preference pairs for DPO / SimPO built from SFT data and the model's own mistakes.

For every SFT row (a prompt, a reference response and its gold answer):

- **chosen** = the reference response (or a re-aligned one: point ``completion_column`` at it). It must itself be
  correct under the checker; rows whose reference fails are dropped and counted (``reference_incorrect``).
- **rejected** = one of the model's own responses to the same prompt that is incorrect. ``num_samples`` (k)
  responses are sampled per prompt with the same generator as evaluation (`trl_onpolicy.eval.evaluation.generate_responses`,
  temperature ``temperature``); the first incorrect one is used.
- Prompts for which all k samples are correct are counted (``no_incorrect_sample``) and handled by
  ``on_no_incorrect``:

  - ``"drop"`` (default): no pair for that prompt.
  - ``"resample"``: draw up to ``max_resample_rounds`` further rounds of k samples (new seeds, temperature
    ``resample_temperature``) for the still-unpaired prompts; those still without an incorrect sample are dropped.
  - ``"corrupt"``: rejected = the chosen response with its final answer replaced by a wrong number (gold + a
    non-zero offset). Keeps the prompt, but that rejected response is NOT the model's own text (off-policy), so
    prefer ``"drop"`` or ``"resample"`` unless the data is tiny.

Output: a `datasets.Dataset` in TRL's conversational preference format (``prompt``: the chat messages,
``chosen`` / ``rejected``: ``[{"role": "assistant", "content": ...}]``) plus a stats dict with every count.

Command line (``trl-onpolicy pairs``)::

    trl-onpolicy pairs --model_name_or_path embedded:smollm2-135m-instruct --task chain_sum --num_prompts 64 \\
        --num_samples 4 --output_dir runs/pairs
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable, Sequence

from trl_onpolicy.eval.answers import EXTRACTORS, extract_answer, gold_answer, grade_response, make_checker, to_number
from trl_onpolicy.utils.errors import work_started
from trl_onpolicy.utils.generation import SamplingConfig

ON_NO_INCORRECT = ("drop", "resample", "corrupt")
# generate_fn(prompts, num_samples, round_index) -> per prompt, a list of response strings
GenerateFn = Callable[[list, int, int], list[list[str]]]


@dataclass
class PairConfig(SamplingConfig):
    """How pairs are built: the sampler fields of `trl_onpolicy.utils.generation.SamplingConfig` (``num_samples`` = k,
    responses sampled per prompt to find an incorrect one, default 4; ``temperature`` > 0, default 1.0; ``top_p``,
    ``max_new_tokens``, ``batch_size``, ``seed``) and:

    Args:
        on_no_incorrect: ``"drop"``, ``"resample"`` or ``"corrupt"`` (see the module docstring).
        max_resample_rounds: extra rounds for ``"resample"``.
        resample_temperature: temperature of the extra rounds (higher finds mistakes more easily).
        checker / extract_order: answer checking, as in evaluation.
        require_correct_reference: drop rows whose reference answer does not check as correct.
        prompt_column / completion_column / answer_column: the SFT columns read.
    """

    num_samples: int = field(default=4, metadata={"help": "k responses sampled per prompt."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (> 0)."})
    on_no_incorrect: str = field(
        default="drop",
        metadata={"help": "drop | resample | corrupt (see trl_onpolicy.eval.preferences).", "choices": list(ON_NO_INCORRECT)},
    )
    max_resample_rounds: int = field(default=2, metadata={"help": "Extra rounds for on_no_incorrect=resample."})
    resample_temperature: float = field(default=1.2, metadata={"help": "Temperature of the extra rounds."})
    checker: str | None = field(default="math_verify", metadata={"help": "Answer checker."})
    extract_order: list[str] = field(
        default_factory=lambda: list(EXTRACTORS), metadata={"help": "Answer extractors, tried in order."}
    )
    require_correct_reference: bool = field(
        default=True, metadata={"help": "Drop rows whose reference answer does not check as correct."}
    )
    prompt_column: str = field(default="prompt", metadata={"help": "Prompt column of the SFT data."})
    completion_column: str = field(default="completion", metadata={"help": "Completion (reference) column."})
    answer_column: str = field(default="answer", metadata={"help": "Final-answer column."})

    def __post_init__(self):
        super().__post_init__()
        if self.on_no_incorrect not in ON_NO_INCORRECT:
            raise ValueError(f"on_no_incorrect={self.on_no_incorrect!r}; choose one of {list(ON_NO_INCORRECT)}.")
        if self.temperature <= 0:
            raise ValueError(
                f"temperature={self.temperature}: pairs need sampled responses (temperature > 0), otherwise all k samples "
                "are identical."
            )


def _text_of(value) -> str:
    """The assistant text of a completion given as a string or as chat messages."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and isinstance(value[-1], dict):
        return "".join(m.get("content", "") for m in value if m.get("role", "assistant") == "assistant")
    raise ValueError(f"A completion must be a string or a list of chat messages; got {type(value).__name__}.")


def _as_prompt_messages(value) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and all(isinstance(m, dict) for m in value):
        return value
    raise ValueError(f"A prompt must be a string or chat messages; got {type(value).__name__}.")


def corrupt_answer(response: str, gold: str, order: Sequence[str] = EXTRACTORS) -> str:
    """``response`` with its final answer replaced by a different number (gold + 1, or gold - 1 when gold + 1 already
    appears as the answer). Used only by ``on_no_incorrect="corrupt"``."""
    value = to_number(gold_answer(gold))
    wrong = str(int(value) + 1) if value is not None and value == int(value) else "0" if value else "1"
    answer = extract_answer(response, order)
    if answer is None:
        return response.rstrip() + f"\n#### {wrong}"
    box = response.rfind("\\boxed{" + answer + "}")
    if box >= 0:
        return response[:box] + "\\boxed{" + wrong + "}" + response[box + len(answer) + 8 :]
    pos = response.rfind(answer)
    return response[:pos] + wrong + response[pos + len(answer) :]


def build_preference_pairs(rows: Sequence[dict], generate_fn: GenerateFn, config: PairConfig | None = None):
    """Pairs and counts from SFT ``rows`` using ``generate_fn`` to sample the model's responses.

    ``generate_fn(prompts, k, round_index)`` must return, for each prompt, k response strings (tests pass a stub;
    `model_generate_fn` wraps the evaluation generator). Returns ``(pairs, stats)``: ``pairs`` a list of
    ``{"prompt", "chosen", "rejected"}`` dicts in input order (conversational), ``stats`` the counts.
    """

    config = config or PairConfig()
    checker = make_checker(config.checker)
    rows = list(rows)
    for col in (config.prompt_column, config.completion_column, config.answer_column):
        if rows and col not in rows[0]:
            raise ValueError(
                f"Preference pairs need a `{col}` column; the data has {sorted(rows[0])}. Set the matching *_column option."
            )
    stats = {
        "num_prompts": len(rows),
        "reference_incorrect": 0,
        "num_samples": config.num_samples,
        "samples_drawn": 0,
        "samples_incorrect": 0,
        "no_incorrect_sample": 0,
        "resampled_paired": 0,
        "corrupted": 0,
        "dropped_no_incorrect": 0,
        "num_pairs": 0,
        "on_no_incorrect": config.on_no_incorrect,
    }
    candidates = []  # indices whose reference is usable
    for i, row in enumerate(rows):
        chosen = _text_of(row[config.completion_column])
        if config.require_correct_reference:
            _, ok = grade_response(chosen, str(row[config.answer_column]), order=config.extract_order, checker=checker)
            if not ok:
                stats["reference_incorrect"] += 1
                continue
        candidates.append(i)

    rejected: dict[int, str] = {}
    pending = list(candidates)
    rounds = 1 + (config.max_resample_rounds if config.on_no_incorrect == "resample" else 0)
    for round_index in range(rounds):
        if not pending:
            break
        prompts = [_as_prompt_messages(rows[i][config.prompt_column]) for i in pending]
        outputs = generate_fn(prompts, config.num_samples, round_index)
        if len(outputs) != len(pending):
            raise RuntimeError(f"generate_fn returned {len(outputs)} lists for {len(pending)} prompts.")
        still = []
        for i, samples in zip(pending, outputs):
            gold = str(rows[i][config.answer_column])
            found = None
            for text in samples:
                stats["samples_drawn"] += 1
                _, ok = grade_response(text, gold, order=config.extract_order, checker=checker)
                if not ok:
                    stats["samples_incorrect"] += 1
                    if found is None:
                        found = text
            if found is not None:
                rejected[i] = found
                if round_index > 0:
                    stats["resampled_paired"] += 1
            else:
                if round_index == 0:
                    stats["no_incorrect_sample"] += 1
                still.append(i)
        pending = still

    pairs = []
    for i in candidates:
        row = rows[i]
        chosen = _text_of(row[config.completion_column])
        if i in rejected:
            bad = rejected[i]
        elif config.on_no_incorrect == "corrupt":
            bad = corrupt_answer(chosen, str(row[config.answer_column]), config.extract_order)
            stats["corrupted"] += 1
        else:
            stats["dropped_no_incorrect"] += 1
            continue
        pairs.append(
            {
                "prompt": _as_prompt_messages(row[config.prompt_column]),
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": bad}],
            }
        )
    stats["num_pairs"] = len(pairs)
    return pairs, stats


def model_generate_fn(model, tokenizer, config: PairConfig, progress: bool = True) -> GenerateFn:
    """A ``generate_fn`` that samples with `trl_onpolicy.eval.evaluation.generate_responses` (the evaluation sampler)."""
    from trl_onpolicy.eval.evaluation import generate_responses

    def generate(prompts, k, round_index):
        temperature = config.temperature if round_index == 0 else config.resample_temperature
        gens = generate_responses(
            model,
            tokenizer,
            prompts,
            num_samples=k,
            temperature=temperature,
            top_p=config.top_p,
            max_new_tokens=config.max_new_tokens,
            batch_size=config.batch_size,
            seed=config.seed + 1000 * round_index,
            progress=progress,
            desc=f"pairs: sampling (round {round_index})",
        )
        return [[g.text for g in samples] for samples in gens]

    return generate


def make_preference_dataset(model, tokenizer, rows, config: PairConfig | None = None, output_dir: str | Path | None = None):
    """Sample with ``model`` and build the pairs; returns ``(datasets.Dataset, stats)`` and, with ``output_dir``,
    saves the dataset there (``save_to_disk``) with ``pairs_stats.json`` beside it."""
    from datasets import Dataset

    config = config or PairConfig()
    pairs, stats = build_preference_pairs(rows, model_generate_fn(model, tokenizer, config), config)
    if not pairs:
        raise RuntimeError(
            f"No preference pair could be built ({json.dumps(stats)}). The model may solve every prompt (try "
            "on_no_incorrect='resample' or 'corrupt', or more samples) or the references fail the checker."
        )
    dataset = Dataset.from_list(pairs)
    if output_dir is not None:
        output_dir = Path(output_dir)
        dataset.save_to_disk(str(output_dir))
        (output_dir / "pairs_stats.json").write_text(json.dumps(stats, indent=2))
    return dataset, stats


# ----------------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class PairArguments(PairConfig):
    """Arguments of ``trl-onpolicy pairs``: every `PairConfig` field, and where the rows come from and go to."""

    model_name_or_path: str = field(default="embedded:smollm2-135m-instruct", metadata={"help": "Model that samples."})
    dataset_name: str | None = field(
        default=None, metadata={"help": "Local SFT data (file or saved folder) with prompt, completion and answer."}
    )
    task: str = field(default="chain_sum", metadata={"help": "reasoning-gym task via trl_onpolicy.data.datasets when no dataset_name."})
    num_prompts: int = field(default=64, metadata={"help": "Number of generated SFT rows when no dataset_name."})
    data_seed: int = field(default=0, metadata={"help": "Seed of the generated SFT rows."})
    output_dir: str = field(default="runs/pairs", metadata={"help": "Where the preference dataset is saved."})


def load_sft_rows(dataset_name: str | None, task: str, n: int, seed: int) -> list[dict]:
    """SFT rows from a local file/folder, or generated offline with `trl_onpolicy.data.datasets.math_word_problems`."""
    if dataset_name:
        from trl_onpolicy.eval.evaluation import _read_table

        return _read_table(dataset_name)
    try:
        from trl_onpolicy.data.datasets import math_word_problems
    except ImportError as err:
        raise ImportError("Generating SFT rows needs trl_onpolicy.data.datasets (not available); pass --dataset_name.") from err
    return list(math_word_problems(n, seed=seed, task=task))


def main(argv: list[str] | None = None) -> int:
    from trl import TrlParser

    from trl_onpolicy.utils.models import load_model

    (args,) = TrlParser(PairArguments).parse_args_and_config(argv)
    from trl_onpolicy.utils.validation import check_nonempty_column, check_output_path, looks_like_local_path

    inputs = [x for x in (args.dataset_name, args.model_name_or_path) if x and looks_like_local_path(str(x))]
    check_output_path(args.output_dir, "pairs output_dir", inputs=inputs)
    config = PairConfig(**{f.name: getattr(args, f.name) for f in fields(PairConfig)})
    rows = load_sft_rows(args.dataset_name, args.task, args.num_prompts, args.data_seed)
    if not rows:
        raise ValueError(f"pairs: the dataset {args.dataset_name!r} has no rows.")
    for column in (config.prompt_column, config.completion_column, config.answer_column):
        if column not in rows[0]:
            raise ValueError(f"pairs: the data has no `{column}` column (it has {sorted(rows[0])}); set the matching "
                             "*_column option.")
    for column in (config.completion_column, config.answer_column):
        check_nonempty_column(rows, column, f"pairs dataset {args.dataset_name!r}")
    model, tokenizer = load_model(args.model_name_or_path, "float32")
    work_started()  # input and model checked: a later error is a failed run (traceback, exit 1), not bad input
    dataset, stats = make_preference_dataset(model, tokenizer, rows, config, args.output_dir)
    print(json.dumps(stats, indent=2))
    print(f"{len(dataset)} pairs saved to {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
