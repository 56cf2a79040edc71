"""Evaluate a causal LM on math benchmark sets (and short factual retention sets): generate, extract, check, score.

Library:

- `generate_responses(model, tokenizer, prompts, ...)`: batched Hugging Face ``generate`` (left padding, prompts
  rendered by `encode_prompts`, ``max_new_tokens``, greedy when ``temperature == 0`` else seeded sampling with top-p),
  ``num_samples`` responses per prompt, tqdm progress. ``backend="vllm"`` uses vLLM instead when it is installed
  (it needs a model folder, not an in-memory model). Preference-pair construction samples with this same function.
- `EvalSet` / `load_eval_set`: a set is a reasoning-gym task (``task: chain_sum``), the built-in factual set
  (``task: facts``), or a local file (``path: data.jsonl`` with ``question``/``prompt`` and ``answer`` columns).
- `evaluate(model, tokenizer, sets, config)`: accuracy per set with a 95% interval; per-sample outputs to jsonl.

Accuracy and its interval. Greedy (``num_samples == 1``): accuracy = correct / n with the Wilson score interval at 95%
(``z = 1.96``), which stays inside [0, 1] and behaves at 0 and n correct. Sampled avg@k (``num_samples = k > 1``):
each prompt's score is its share of correct samples; accuracy is the mean over prompts, and because the k samples of
one prompt are correlated, the prompt is the independent unit: the interval is ``mean +- 1.96 * sd / sqrt(n)`` over
the n per-prompt scores (a normal approximation; clipped to [0, 1]). With k = 1 both reduce to n Bernoulli trials.

The command line (``trl-onpolicy eval``) is `trl_onpolicy.cli.eval`; its set specs are `EvalSet.from_spec` strings.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

import torch

from trl_onpolicy.data.prompts import render_prompt_ids
from trl_onpolicy.eval.answers import EXTRACTORS, grade_response, make_checker
from trl_onpolicy.utils.generation import SamplingConfig, generate_ids
from trl_onpolicy.utils.io import atomic_file, write_json_atomic

Z95 = 1.959963984540054


# ----------------------------------------------------------------------------------------------------------------------
# Intervals
# ----------------------------------------------------------------------------------------------------------------------


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (``(0, 0)`` at ``n = 0``)."""
    if n <= 0:
        return 0.0, 0.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # the exact ends are 0 at no success and 1 at all successes; pin them against rounding
    low = 0.0 if successes <= 0 else max(0.0, centre - half)
    high = 1.0 if successes >= n else min(1.0, centre + half)
    return low, high


def mean_interval(values: Sequence[float], z: float = Z95) -> tuple[float, float]:
    """Normal-approximation interval of a mean over independent units, clipped to [0, 1]."""
    n = len(values)
    if n == 0:
        return 0.0, 0.0
    mean = sum(values) / n
    if n == 1:
        return mean, mean
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    half = z * math.sqrt(var / n)
    return max(0.0, mean - half), min(1.0, mean + half)


def accuracy_with_ci(per_prompt_correct: Sequence[Sequence[bool]]) -> dict:
    """Accuracy and 95% interval from per-prompt lists of sample correctness (see the module docstring)."""
    n = len(per_prompt_correct)
    k = max((len(c) for c in per_prompt_correct), default=1)
    scores = [sum(c) / len(c) if len(c) else 0.0 for c in per_prompt_correct]
    accuracy = sum(scores) / n if n else 0.0
    if k == 1:
        low, high = wilson_interval(sum(scores), n)
        method = "wilson"
    else:
        low, high = mean_interval(scores)
        method = f"normal over {n} per-prompt avg@{k} scores"
    return {"accuracy": accuracy, "ci_low": low, "ci_high": high, "ci_method": method, "num_prompts": n, "k": k}


# ----------------------------------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class Generation:
    """One generated response."""

    text: str
    num_tokens: int
    finished: bool  # ended with an EOS token (else it hit max_new_tokens)


def _as_messages(prompt) -> list[dict]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list) and all(isinstance(m, dict) and "role" in m for m in prompt):
        return prompt
    raise ValueError(
        f"A prompt must be a string or a list of chat messages ({{'role': ..., 'content': ...}}); got {type(prompt).__name__}."
    )


def encode_prompts(tokenizer, prompts: Sequence) -> list[list[int]]:
    """Token ids to generate from, one list per prompt (strings or chat messages). Evaluation's data convention: a
    plain-question prompt becomes one user turn when the tokenizer has a chat template (and stays text otherwise);
    then THE prompt renderer (`trl_onpolicy.data.prompts.render_prompt_ids`) tokenizes it as SFTTrainer tokenizes a
    training prompt (chat template with the generation prompt)."""
    chat = bool(getattr(tokenizer, "chat_template", None))  # without one, chat messages are refused by the renderer
    return [render_prompt_ids(tokenizer, _as_messages(p) if chat else p) for p in prompts]


@torch.no_grad()
def generate_batched(
    model,
    tokenizer,
    encoded: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    batch_size: int,
    seed: int,
    progress: bool = True,
    desc: str = "generate",
) -> list[tuple[list[int], bool]]:
    """(new token ids, finished) for each tokenized prompt, in input order. Rows are sorted by prompt length (longest
    first, ties in input order) so batches pad little; batch b is seeded with ``seed + b``, so sampling repeats for
    the same inputs. The one batching loop behind `generate_responses` and `forgetting.sample_base_responses`."""
    from tqdm.auto import tqdm

    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    out: list[tuple[list[int], bool] | None] = [None] * len(encoded)
    bar = tqdm(total=len(order), desc=desc, unit="seq", disable=not progress, dynamic_ncols=True)
    for b, start in enumerate(range(0, len(order), batch_size)):
        batch = order[start : start + batch_size]
        torch.manual_seed(seed + b)
        results = generate_ids(model, tokenizer, [encoded[i] for i in batch], max_new_tokens=max_new_tokens,
                               temperature=temperature, top_p=top_p)
        for i, (ids, finished) in zip(batch, results):
            out[i] = (list(ids), finished)
        bar.update(len(batch))
    bar.close()
    return out  # type: ignore[return-value]


@torch.no_grad()
def generate_responses(
    model,
    tokenizer,
    prompts: Sequence,
    *,
    num_samples: int = 1,
    temperature: float = 0.0,
    top_p: float = 1.0,
    max_new_tokens: int = 256,
    batch_size: int = 8,
    seed: int = 0,
    backend: str = "hf",
    progress: bool = True,
    desc: str = "generate",
) -> list[list[Generation]]:
    """``num_samples`` responses for each prompt (strings or chat messages), in input order.

    Rows (prompt x sample) are sorted by prompt length so batches pad little; each batch is left-padded and decoded
    with ``model.generate``. Greedy when ``temperature == 0`` (then every sample of a prompt is the same, so only one
    is decoded and copied). Sampling is seeded per batch (``seed + batch index``) and therefore reproducible.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if backend == "vllm":
        return _generate_vllm(model, tokenizer, prompts, num_samples, temperature, top_p, max_new_tokens, seed)
    if backend != "hf":
        raise ValueError(f"Unknown generation backend {backend!r}; use 'hf' or 'vllm'.")
    encoded = encode_prompts(tokenizer, prompts)
    greedy = temperature <= 0
    draws = 1 if greedy else num_samples
    rows = [(i, j) for i in range(len(encoded)) for j in range(draws)]
    outs = generate_batched(model, tokenizer, [encoded[i] for i, _ in rows], max_new_tokens=max_new_tokens,
                            temperature=temperature, top_p=top_p, batch_size=batch_size, seed=seed,
                            progress=progress, desc=desc)
    results: list[list[Generation | None]] = [[None] * draws for _ in encoded]
    for (i, j), (ids, finished) in zip(rows, outs):
        results[i][j] = Generation(text=tokenizer.decode(ids, skip_special_tokens=True), num_tokens=len(ids),
                                   finished=finished)
    if greedy and num_samples > 1:
        return [[r[0]] * num_samples for r in results]
    return results  # type: ignore[return-value]


def _generate_vllm(model, tokenizer, prompts, num_samples, temperature, top_p, max_new_tokens, seed):
    try:
        from vllm import LLM, SamplingParams
    except ImportError as err:
        raise ImportError("backend='vllm' needs the `vllm` package; install it or use backend='hf'.") from err
    path = model if isinstance(model, (str, os.PathLike)) else getattr(model, "name_or_path", None)
    if not path or not Path(path).exists():
        raise ValueError("backend='vllm' loads the model itself: pass a local model folder (save the model first).")
    llm = LLM(model=str(path), seed=seed)
    params = SamplingParams(n=num_samples, temperature=max(temperature, 0.0), top_p=top_p, max_tokens=max_new_tokens)
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in encode_prompts(tokenizer, prompts)], params)
    return [
        [Generation(o.text, len(o.token_ids), o.finish_reason == "stop") for o in out.outputs] for out in outputs
    ]


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation sets
# ----------------------------------------------------------------------------------------------------------------------

# A short factual / instruction-following retention set written for this project (offline, no licence concerns):
# questions a 135M instruct model mostly answers, so a drop after math fine-tuning shows lost general ability.
# Answers: "|"-separated accepted alternatives, matched as whole words.
FACTS = [
    ("What is the capital of France?", "Paris"),
    ("What is the capital of Japan?", "Tokyo"),
    ("What is the capital of Italy?", "Rome"),
    ("What is the capital of Germany?", "Berlin"),
    ("What is the capital of Spain?", "Madrid"),
    ("What is the capital of the United Kingdom?", "London"),
    ("What is the capital of Russia?", "Moscow"),
    ("What is the capital of China?", "Beijing|Peking"),
    ("What is the capital of Egypt?", "Cairo"),
    ("What is the capital of Canada?", "Ottawa"),
    ("What is the capital of Australia?", "Canberra"),
    ("What is the capital of the United States?", "Washington"),
    ("What is the capital of Greece?", "Athens"),
    ("What is the capital of Portugal?", "Lisbon"),
    ("What is the largest planet in our solar system?", "Jupiter"),
    ("Which planet is known as the Red Planet?", "Mars"),
    ("Which planet is closest to the Sun?", "Mercury"),
    ("What star is at the centre of our solar system?", "Sun|the sun"),
    ("What is the natural satellite of the Earth called?", "Moon|the moon"),
    ("What gas do plants absorb from the air for photosynthesis?", "carbon dioxide|CO2"),
    ("What gas do humans need to breathe to live?", "oxygen"),
    ("What is the chemical formula of water?", "H2O"),
    ("What is the chemical symbol for gold?", "Au"),
    ("What is the freezing point of water in degrees Celsius?", "0|zero"),
    ("What is the boiling point of water in degrees Celsius at sea level?", "100"),
    ("How many days are there in a week?", "7|seven"),
    ("How many months are there in a year?", "12|twelve"),
    ("How many hours are there in a day?", "24|twenty-four|twenty four"),
    ("How many minutes are in an hour?", "60|sixty"),
    ("How many legs does a spider have?", "8|eight"),
    ("How many legs does a dog have?", "4|four"),
    ("How many continents are there on Earth?", "7|seven"),
    ("What is the largest ocean on Earth?", "Pacific"),
    ("What is the longest river in Africa?", "Nile"),
    ("What is the tallest mountain in the world?", "Everest"),
    ("What is the largest desert in Africa?", "Sahara"),
    ("Who wrote the play Romeo and Juliet?", "Shakespeare"),
    ("Who painted the Mona Lisa?", "Leonardo|da Vinci|Vinci"),
    ("Who developed the theory of relativity?", "Einstein"),
    ("Who was the first person to walk on the Moon?", "Armstrong"),
    ("What colour do you get by mixing blue and yellow?", "green"),
    ("What colour is the sky on a clear day?", "blue"),
    ("What colour are ripe bananas?", "yellow"),
    ("What is the opposite of hot?", "cold"),
    ("What is the opposite of up?", "down"),
    ("What is the opposite of day?", "night"),
    ("What animal is known as the king of the jungle?", "lion"),
    ("What is the largest mammal in the world?", "blue whale|whale"),
    ("What do bees make?", "honey"),
    ("What is frozen water called?", "ice"),
    ("What language is mainly spoken in Brazil?", "Portuguese"),
    ("What language is mainly spoken in Mexico?", "Spanish"),
    ("What is the currency of Japan?", "yen"),
    ("What is the currency of the United Kingdom?", "pound|pounds|sterling"),
    ("Which organ pumps blood through the human body?", "heart"),
    ("What is the hardest natural substance?", "diamond|diamonds"),
    ("On which continent is Kenya?", "Africa"),
    ("On which continent is Argentina?", "South America"),
    ("What is the plural of mouse?", "mice"),
    ("What is the first letter of the English alphabet?", "A"),
]


@dataclass
class EvalSet:
    """One evaluation set.

    Args:
        name: label in reports and file names.
        task: a reasoning-gym task name (e.g. ``chain_sum``, ``gsm_symbolic``, ``basic_arithmetic``), ``"facts"``
            (the built-in factual retention set, checked with ``"contains"``), or ``"file"`` (read ``path``).
        n: number of problems (``None`` = all of a file / the facts set).
        seed: generator seed; use seeds the training data does not use so the problems are held out.
        path: a local ``.jsonl``/``.json``/``.csv``/``.parquet`` file or saved dataset folder for ``task="file"``,
            with ``answer`` and either ``question`` (a string) or ``prompt`` (a string or chat messages).
        role: ``"in_domain"``, ``"ood"`` or ``"retention"``; retention sets get a change-vs-base column in compare.
        checker: ``"math_verify"`` (default for math), ``"numeric"``, ``"exact"``, ``"contains"`` (default for facts)
            or ``"package.module:function"``.
        extract_order: answer extractors tried in order (``boxed``, ``hash``, ``last_number``).
        prompt_template: format string with ``{question}`` applied to every question (file, reasoning-gym, and the
            tasks of `trl_onpolicy.data.datasets`, after the format instruction); not to the facts set.
        max_new_tokens: overrides the evaluation's ``max_new_tokens`` for this set.
        task_kwargs: reasoning-gym settings of the task (e.g. ``{"min_terms": 2, "max_terms": 3}``).
        format_instruction: append `trl_onpolicy.data.datasets`'s answer-format instruction to each question.

    Tasks that `trl_onpolicy.data.datasets.math_word_problems` supports are drawn from its ``"test"`` split, which is disjoint
    from its ``"train"`` split by question, with the same prompt format as the training data; other reasoning-gym
    tasks come straight from ``reasoning_gym.create_dataset(task, size=n, seed=seed)``.
    """

    name: str
    task: str = "file"
    n: int | None = None
    seed: int = 10_000
    path: str | None = None
    role: str = "in_domain"
    checker: str | None = None
    extract_order: list[str] = field(default_factory=lambda: list(EXTRACTORS))
    prompt_template: str = "{question}"
    max_new_tokens: int | None = None
    task_kwargs: dict = field(default_factory=dict)
    format_instruction: bool = False

    def __post_init__(self):
        from trl_onpolicy.utils.validation import OPTIONAL_COUNT, Range, check_fields

        check_fields(self, {"n": OPTIONAL_COUNT, "seed": Range(integer=True), "max_new_tokens": OPTIONAL_COUNT},
                     owner=f"EvalSet {self.name!r}")
        if self.role not in ("in_domain", "ood", "retention"):
            raise ValueError(f"EvalSet {self.name!r}: role={self.role!r}; use 'in_domain', 'ood' or 'retention'.")
        if self.task == "file" and not self.path:
            raise ValueError(f"EvalSet {self.name!r}: task='file' needs `path` (a local data file or folder).")
        if self.checker is None:
            self.checker = "contains" if self.task == "facts" else "math_verify"
        make_checker(self.checker)  # fail early on an unknown checker
        for name in self.extract_order:
            if name not in EXTRACTORS:
                raise ValueError(f"EvalSet {self.name!r}: unknown extractor {name!r}; choose from {list(EXTRACTORS)}.")

    @classmethod
    def from_spec(cls, spec: "EvalSet | dict | str") -> "EvalSet":
        """From an `EvalSet`, a mapping of its fields, or a string ``name=task[:n[:seed]]`` / ``name=path``."""
        if isinstance(spec, EvalSet):
            return spec
        if isinstance(spec, dict):
            known = {f.name for f in fields(cls)}
            unknown = sorted(set(spec) - known)
            if unknown:
                raise ValueError(f"Evaluation set {spec.get('name', spec)!r}: unknown key(s) {unknown}; known: {sorted(known)}.")
            if "name" not in spec:
                raise ValueError(f"Evaluation set {spec!r} needs a `name`.")
            return cls(**spec)
        if not isinstance(spec, str) or "=" not in spec:
            raise ValueError(f"Evaluation set spec {spec!r} must look like 'name=task[:n[:seed]]' or 'name=path/to/file'.")
        name, _, rest = spec.partition("=")
        if os.path.exists(rest) or any(rest.endswith(e) for e in (".jsonl", ".json", ".csv", ".parquet")):
            return cls(name=name, task="file", path=rest)
        parts = rest.split(":")
        kwargs: dict[str, Any] = {"name": name, "task": parts[0]}
        try:
            if len(parts) > 1 and parts[1]:
                kwargs["n"] = int(parts[1])
            if len(parts) > 2 and parts[2]:
                kwargs["seed"] = int(parts[2])
        except ValueError as err:
            raise ValueError(f"Evaluation set spec {spec!r}: n and seed must be integers ({err}).") from err
        if parts[0] == "facts":
            kwargs["role"] = "retention"
        return cls(**kwargs)


def _read_table(path: str) -> list[dict]:
    from datasets import Dataset, load_dataset, load_from_disk

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"Evaluation data {path!r} does not exist.")
    if p.is_dir():
        ds = load_from_disk(str(p))
        if not isinstance(ds, Dataset):
            ds = ds["test"] if "test" in ds else ds[list(ds.keys())[0]]
    else:
        kind = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}.get(p.suffix)
        if kind is None:
            raise ValueError(f"Evaluation data {path!r}: use a .jsonl, .json, .csv or .parquet file or a saved dataset folder.")
        from trl_onpolicy.utils.validation import check_text_file

        check_text_file(p, "data")
        try:
            ds = load_dataset(kind, data_files=str(p), split="train")
        except Exception as err:  # noqa: BLE001 - malformed file: name it
            cause = err.__cause__ or err
            raise ValueError(f"data file {path!r} could not be read as {kind}: {type(cause).__name__}: "
                             f"{' '.join(str(cause).split())[:300]}") from err
    return list(ds)


def load_eval_set(spec: EvalSet) -> list[dict]:
    """Rows ``{"id", "prompt", "answer"}`` (prompt: chat messages) of a set; deterministic for a given spec."""
    if spec.task == "facts":
        items = FACTS if spec.n is None else random.Random(spec.seed).sample(FACTS, min(spec.n, len(FACTS)))
        return [
            {"id": i, "prompt": [{"role": "user", "content": q + " Answer in a few words."}], "answer": a}
            for i, (q, a) in enumerate(items)
        ]
    if spec.task == "file":
        rows = []
        for i, row in enumerate(_read_table(spec.path)):
            if "answer" not in row or not ("question" in row or "prompt" in row):
                raise ValueError(
                    f"Evaluation file {spec.path!r} row {i} needs an `answer` column and a `question` or `prompt` column; "
                    f"it has {sorted(row)}."
                )
            prompt = row.get("prompt")
            if prompt is None or (isinstance(prompt, str) and "question" in row):
                prompt = spec.prompt_template.format(question=row["question"])
            rows.append({"id": row.get("id", i), "prompt": _as_messages(prompt), "answer": str(row["answer"])})
        return rows if spec.n is None else rows[: spec.n]
    try:
        from trl_onpolicy.data.datasets import TASKS, math_word_problems
    except ImportError:
        TASKS = ()
    if spec.task in TASKS:
        data = math_word_problems(
            spec.n or 100, seed=spec.seed, task=spec.task, split="test", format_instruction=spec.format_instruction,
            prompt_template=spec.prompt_template, **spec.task_kwargs,
        )
        return [{"id": i, "prompt": row["prompt"], "answer": str(row["answer"])} for i, row in enumerate(data)]
    try:
        import reasoning_gym
    except ImportError as err:
        raise ImportError(f"Evaluation set {spec.name!r} uses reasoning-gym task {spec.task!r}: install `reasoning-gym`.") from err
    try:
        data = reasoning_gym.create_dataset(spec.task, size=spec.n or 100, seed=spec.seed, **spec.task_kwargs)
    except Exception as err:
        raise ValueError(f"Evaluation set {spec.name!r}: reasoning-gym could not build task {spec.task!r} ({err}).") from err
    return [
        {
            "id": i,
            "prompt": [{"role": "user", "content": spec.prompt_template.format(question=entry["question"])}],
            "answer": str(entry["answer"]),
        }
        for i, entry in enumerate(data)
    ]


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class EvalConfig(SamplingConfig):
    """Generation and scoring settings shared by every set of one evaluation: the sampler fields of
    `trl_onpolicy.utils.generation.SamplingConfig` (``num_samples``: 1 = greedy pass@1 with ``temperature=0``, k > 1 =
    avg@k; ``temperature``, ``top_p``, ``max_new_tokens`` (per-set override: `EvalSet.max_new_tokens`),
    ``batch_size``, ``seed``) and:

    Args:
        backend: ``"hf"`` (``model.generate``) or ``"vllm"`` (when installed; needs a model folder).
        check_workers: threads grading responses (math-verify runs with its timeouts off in threads).
        progress: show tqdm bars.
    """

    num_samples: int = field(default=1, metadata={"help": "Samples per prompt (k of avg@k; needs temperature > 0)."})
    backend: str = field(default="hf", metadata={"help": "'hf' or 'vllm' (when installed).", "choices": ["hf", "vllm"]})
    check_workers: int = field(default=1, metadata={"help": "Threads grading answers."})
    progress: bool = field(default=True, metadata={"help": "Show progress bars."})

    def __post_init__(self):
        super().__post_init__()
        if self.num_samples > 1 and self.temperature <= 0:
            raise ValueError(
                f"num_samples={self.num_samples} with temperature={self.temperature}: greedy decoding gives k identical "
                "samples. Set temperature > 0 for avg@k, or num_samples=1."
            )


def evaluate_set(model, tokenizer, spec: EvalSet, config: EvalConfig, output_file: str | Path | None = None,
                 rows: list[dict] | None = None) -> dict:
    """Evaluate one set (its ``rows``, default `load_eval_set`); returns its metrics and (when ``output_file`` is
    given) writes one jsonl row per prompt."""
    rows = load_eval_set(spec) if rows is None else rows
    if not rows:
        raise ValueError(f"Evaluation set {spec.name!r} is empty.")
    start = time.perf_counter()
    gens = generate_responses(
        model,
        tokenizer,
        [r["prompt"] for r in rows],
        num_samples=config.num_samples,
        temperature=config.temperature,
        top_p=config.top_p,
        max_new_tokens=spec.max_new_tokens or config.max_new_tokens,
        batch_size=config.batch_size,
        seed=config.seed,
        backend=config.backend,
        progress=config.progress,
        desc=f"eval {spec.name}",
    )
    checker = make_checker(spec.checker)

    def grade(pair):
        row, samples = pair
        return [grade_response(g.text, row["answer"], order=spec.extract_order, checker=checker) for g in samples]

    pairs = list(zip(rows, gens))
    if config.check_workers > 1:
        with ThreadPoolExecutor(config.check_workers) as pool:
            graded = list(pool.map(grade, pairs))
    else:
        graded = [grade(p) for p in pairs]
    metrics = accuracy_with_ci([[ok for _, ok in g] for g in graded])
    all_gens = [g for samples in gens for g in samples]
    all_graded = [x for g in graded for x in g]
    metrics.update(
        name=spec.name,
        role=spec.role,
        task=spec.task,
        answer_found=sum(e is not None for e, _ in all_graded) / len(all_graded),
        finished=sum(g.finished for g in all_gens) / len(all_gens),
        mean_new_tokens=sum(g.num_tokens for g in all_gens) / len(all_gens),
        seconds=time.perf_counter() - start,
    )
    if output_file is not None:
        with atomic_file(output_file) as fh:
            for row, samples, grades in zip(rows, gens, graded):
                record = {
                    "id": row["id"],
                    "prompt": row["prompt"],
                    "answer": row["answer"],
                    "samples": [
                        {"response": g.text, "extracted": e, "correct": ok, "num_tokens": g.num_tokens, "finished": g.finished}
                        for g, (e, ok) in zip(samples, grades)
                    ],
                    "score": sum(ok for _, ok in grades) / len(grades),
                }
                fh.write(json.dumps(record, ensure_ascii=False) + "\n")
    return metrics


def evaluate(
    model, tokenizer, sets: Sequence[EvalSet | dict | str], config: EvalConfig | None = None, output_dir: str | Path | None = None,
    model_fingerprint: str | None = None,
) -> dict[str, dict]:
    """Evaluate several sets (e.g. in-domain, out-of-domain, retention) with one model; ``{set name: metrics}``.
    Per-sample outputs go to ``output_dir/<set>.jsonl``, the metrics to ``output_dir/metrics.json`` and what produced
    them to ``output_dir/fingerprint.json`` (`eval_fingerprint`; ``model_fingerprint`` skips hashing the weights)."""
    config = config or EvalConfig()
    specs = [EvalSet.from_spec(s) for s in sets]
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"Evaluation set names must be unique; got {names}.")
    results = {}
    for spec in specs:
        out = Path(output_dir) / f"{spec.name}.jsonl" if output_dir is not None else None
        results[spec.name] = evaluate_set(model, tokenizer, spec, config, out)
    if output_dir is not None:
        write_json_atomic(Path(output_dir) / "metrics.json", results)
        write_json_atomic(Path(output_dir) / "fingerprint.json", eval_fingerprint(model, specs, config, model_fingerprint))
    return results


def eval_fingerprint(model, specs: Sequence[EvalSet], config: EvalConfig, weights: str | None = None) -> dict:
    """What produced an evaluation's outputs (written to ``output_dir/fingerprint.json``): the weights (given, or the
    model folder's weight files, or the in-memory state dict), the content of each set's rows, and every setting
    that changes a response or a grade. Two outputs with equal fingerprints are interchangeable."""
    from dataclasses import asdict

    from trl_onpolicy.utils import fingerprint as fp

    if weights is None:
        weights = fp.model_fingerprint(model)
    settings = {k: v for k, v in asdict(config).items() if k not in ("progress", "check_workers")}
    sets = {s.name: {"data": fp.data_fingerprint(load_eval_set(s)),
                     "settings": fp.settings_fingerprint({k: v for k, v in asdict(s).items() if k != "path"})} for s in specs}
    return {"model": weights, "settings": fp.settings_fingerprint(settings), "sets": sets}


def format_metrics(results: dict[str, dict]) -> str:
    lines = [f"{'set':<16} {'role':<10} {'acc':>7}  95% CI            n   k"]
    for name, m in results.items():
        lines.append(
            f"{name:<16} {m['role']:<10} {100 * m['accuracy']:6.1f}%  [{100 * m['ci_low']:5.1f}, {100 * m['ci_high']:5.1f}]"
            f"  {m['num_prompts']:4d} {m['k']:3d}"
        )
    return "\n".join(lines)
