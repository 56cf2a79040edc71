"""Offline math data for training and evaluation, and one loader for SFT datasets wherever they live.

`math_word_problems` builds TRL conversational prompt/completion datasets from `reasoning-gym`'s seeded generators
(no network). Every sample has a worked solution whose LAST LINE states the final answer in one checkable form:

- ``answer_format="gsm"`` (default): the last line is ``#### <answer>`` (GSM8K's convention);
- ``answer_format="boxed"``: the last line is ``The final answer is \\boxed{<answer>}.``

``<answer>`` is exactly the ``answer`` column (reasoning-gym's reference answer), so the project's one grader
(`trl_onpolicy.eval.answers.grade_response`) finds it in the solution, and grades generated responses the same way.

Supported tasks (`TASKS`), to build in-domain and out-of-domain sets:

| task | problems | worked solution |
|---|---|---|
| ``gsm_symbolic`` | GSM8K-derived word problems | reasoning-gym's own step-by-step solution |
| ``chain_sum`` | ``a + b - c ...`` | running total, one operation per line |
| ``basic_arithmetic`` | ``+ - * /`` with parentheses, negation | one reduction per line (exact divisions only) |
| ``simple_equations`` | linear equations in one unknown | isolate the unknown, then divide |
| ``leg_counting`` | count the legs of a list of animals | legs per animal kind, then the sum |

Train and test splits are disjoint by construction: a question belongs to the test split when a hash of its text
falls in the lowest ``test_fraction`` of the hash range, whatever the seed. Different seeds give different samples
of a split; the same seed gives the same dataset.
"""

from __future__ import annotations

import ast
import hashlib
import operator
from fractions import Fraction
from pathlib import Path

TASKS = ("gsm_symbolic", "chain_sum", "basic_arithmetic", "simple_equations", "leg_counting")
ANSWER_FORMATS = ("gsm", "boxed")
FORMAT_INSTRUCTIONS = {
    "gsm": "Solve the problem step by step, then give the final answer on the last line as '#### <answer>'.",
    "boxed": "Solve the problem step by step, then give the final answer as \\boxed{<answer>}.",
}
SPLITS = ("train", "test")
_SEED_STRIDE = 10_000_019  # reasoning-gym seeds each item with seed + index: space the seeds far apart


# --------------------------------------------------------------------------------------------------------------------
# answers


def final_answer_line(answer: str, answer_format: str = "gsm") -> str:
    if answer_format == "gsm":
        return f"#### {answer}"
    if answer_format == "boxed":
        return f"The final answer is \\boxed{{{answer}}}."
    raise ValueError(f"Unknown answer_format {answer_format!r}; choose one of {ANSWER_FORMATS}.")


# --------------------------------------------------------------------------------------------------------------------
# worked solutions, one function per task; each returns the solution body WITHOUT the final-answer line, or None
# when the sample cannot get an exact worked solution (it is then skipped)


def _num(x) -> str:
    x = Fraction(x)
    return str(x.numerator) if x.denominator == 1 else f"{x.numerator}/{x.denominator}"


def _solve_gsm_symbolic(entry) -> str | None:
    cot = entry["metadata"].get("answer_cot")
    if not cot:
        return None
    lines = cot.strip().split("\n")
    if lines[-1].lstrip().startswith("####"):
        lines = lines[:-1]
    return "\n".join(lines).strip()


def _operand(x: int) -> str:
    return f"({x})" if x < 0 else str(x)


def _solve_chain_sum(entry) -> str | None:
    tokens = entry["metadata"]["expression"].split()
    # "a op b op c ...": numbers at even positions, operators at odd ones
    total, lines = int(tokens[0]), []
    for op, tok in zip(tokens[1::2], tokens[2::2]):
        value = int(tok)
        new = total + value if op == "+" else total - value
        lines.append(f"{total} {op} {_operand(value)} = {new}")
        total = new
    return "\n".join(lines)


_BIN_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: None}


class _Inexact(Exception):
    pass


def _reduce_once(node):
    """Evaluate the leftmost innermost operation of ``node`` (an expression AST); returns (new_node, changed)."""
    if isinstance(node, ast.Constant):
        return node, False
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        if isinstance(node.operand, ast.Constant):
            v = node.operand.value
            return ast.Constant(-v if isinstance(node.op, ast.USub) else v), True
        inner, changed = _reduce_once(node.operand)
        return ast.UnaryOp(node.op, inner), changed
    if isinstance(node, ast.BinOp) and type(node.op) in _BIN_OPS:
        if isinstance(node.left, ast.Constant) and isinstance(node.right, ast.Constant):
            a, b = node.left.value, node.right.value
            if isinstance(node.op, ast.Div):
                if b == 0 or a % b:
                    raise _Inexact
                return ast.Constant(a // b), True
            return ast.Constant(_BIN_OPS[type(node.op)](a, b)), True
        left, changed = _reduce_once(node.left)
        if changed:
            return ast.BinOp(left, node.op, node.right), True
        right, changed = _reduce_once(node.right)
        return ast.BinOp(node.left, node.op, right), changed
    raise ValueError(f"unsupported expression node {ast.dump(node)}")


def _solve_basic_arithmetic(entry) -> str | None:
    expression = entry["metadata"]["expression"]
    node = ast.parse(expression, mode="eval").body
    lines = [ast.unparse(node)]
    try:
        while not isinstance(node, ast.Constant):
            node, changed = _reduce_once(node)
            if not changed:
                return None
            text = ast.unparse(node)
            if text != lines[-1].removeprefix("= "):  # folding a literal sign (-(5) -> -5) reads the same: skip
                lines.append("= " + text)
    except _Inexact:
        return None
    if str(node.value) != str(entry["answer"]).strip():
        return None
    return "\n".join(lines)


def _solve_simple_equations(entry) -> str | None:
    import sympy

    meta = entry["metadata"]
    x = sympy.Symbol(meta["variable"])
    lhs_text, rhs_text = meta["equation"].split("=")
    lhs, rhs = sympy.sympify(lhs_text), sympy.sympify(rhs_text)
    poly = sympy.Poly(sympy.expand(lhs), x)
    if poly.degree() != 1:
        return None
    a, b = (int(c) for c in poly.all_coeffs())
    rhs = int(rhs)
    v = meta["variable"]
    lines = [f"{meta['equation']}"]
    expanded = sympy.expand(lhs)
    if str(expanded) != lhs_text.strip():
        lines.append(f"Expand the left side: {expanded} = {rhs}")
    right = rhs
    if b:
        right = rhs - b
        action = f"Subtract {b} from" if b > 0 else f"Add {-b} to"
        lines.append(f"{action} both sides: {a}*{v} = {rhs} {'-' if b > 0 else '+'} {abs(b)} = {right}")
    if a != 1:
        if Fraction(right, a).denominator != 1:
            return None
        lines.append(f"Divide both sides by {a}: {v} = {right} / {_operand(a)} = {right // a}")
    value = right // a if a != 1 else right
    if str(value) != str(entry["answer"]).strip():
        return None
    return "\n".join(lines)


def _solve_leg_counting(entry) -> str | None:
    from reasoning_gym.arithmetic.leg_counting import ANIMALS

    animals = entry["metadata"]["animals"]
    lines, parts = [], []
    for name, count in animals.items():
        legs = ANIMALS[name]
        lines.append(f"{name}: {count} x {legs} legs = {count * legs} legs")
        parts.append(count * legs)
    total = sum(parts)
    lines.append(f"Total: {' + '.join(map(str, parts))} = {total}")
    if str(total) != str(entry["answer"]).strip():
        return None
    return "\n".join(lines)


_SOLVERS = {
    "gsm_symbolic": _solve_gsm_symbolic,
    "chain_sum": _solve_chain_sum,
    "basic_arithmetic": _solve_basic_arithmetic,
    "simple_equations": _solve_simple_equations,
    "leg_counting": _solve_leg_counting,
}


# --------------------------------------------------------------------------------------------------------------------
# datasets


def question_split(question: str, task: str, test_fraction: float) -> str:
    """``"test"`` or ``"train"``: a fixed function of the question text, so the two splits can never overlap."""
    digest = int(hashlib.sha256(f"{task}\x00{question.strip()}".encode()).hexdigest()[:12], 16)
    return "test" if digest / float(16**12) < test_fraction else "train"


def math_word_problems(
    n: int,
    seed: int = 0,
    task: str = "gsm_symbolic",
    split: str = "train",
    *,
    system_prompt: str | None = None,
    answer_format: str = "gsm",
    format_instruction: bool = False,
    prompt_template: str = "{question}",
    test_fraction: float = 0.2,
    max_solution_chars: int | None = None,
    **task_kwargs,
):
    """``n`` distinct math problems with worked solutions, as a `datasets.Dataset`, built offline with reasoning-gym.

    Columns:
        prompt (list of messages): optional ``{"role": "system", "content": system_prompt}``, then the user question
            (followed by `FORMAT_INSTRUCTIONS[answer_format]` when ``format_instruction``);
        completion (list of messages): one assistant message holding ``solution``;
        question (str), solution (str, ending with the final-answer line, see the module docstring), answer (str),
        task (str).

    Args:
        n: number of samples (distinct questions).
        seed: samples differ between seeds and repeat for the same seed.
        task: one of `TASKS`.
        split: ``"train"`` or ``"test"``; disjoint by question (see `question_split`).
        system_prompt: optional system message prepended to every prompt.
        answer_format: ``"gsm"`` (last line ``#### N``) or ``"boxed"`` (``\\boxed{N}``).
        format_instruction: append an instruction on the answer format to the question (useful to evaluate a model
            that has not been trained on the format).
        prompt_template: format string with ``{question}`` giving the user turn (after the format instruction).
        test_fraction: share of the question space that belongs to the test split.
        max_solution_chars: skip problems whose worked solution is longer (keeps CPU runs short).
        **task_kwargs: passed to the reasoning-gym config of the task (e.g. ``min_terms=2, max_digits=2``).
    """
    import reasoning_gym
    from datasets import Dataset

    if task not in _SOLVERS:
        raise ValueError(f"Unknown task {task!r}; math_word_problems supports {list(TASKS)}.")
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; choose 'train' or 'test'.")
    if answer_format not in ANSWER_FORMATS:
        raise ValueError(f"Unknown answer_format {answer_format!r}; choose one of {ANSWER_FORMATS}.")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction={test_fraction} must lie strictly between 0 and 1.")
    if n < 1:
        raise ValueError(f"n={n}: ask for at least one sample.")

    solver = _SOLVERS[task]
    rows, seen = [], set()
    chunk = max(64, 2 * n)
    attempts, round_, stale_rounds = 0, 0, 0
    while len(rows) < n:
        if stale_rounds >= 2:
            raise RuntimeError(
                f"Only {len(rows)} distinct {split} problems of task {task!r} found after {attempts} draws (wanted {n}). "
                f"The task settings {task_kwargs or '(defaults)'} allow too few different questions: ask for fewer "
                "samples or widen the settings (more terms or digits)."
            )
        ds = reasoning_gym.create_dataset(task, size=chunk, seed=seed * _SEED_STRIDE + round_ * chunk, **task_kwargs)
        round_ += 1
        seen_before = len(seen)
        for i in range(chunk):
            attempts += 1
            entry = ds[i]
            question = entry["question"].strip()
            if question in seen or question_split(question, task, test_fraction) != split:
                continue
            seen.add(question)
            body = solver(entry)
            if body is None:
                continue
            answer = str(entry["answer"]).strip()
            solution = f"{body}\n{final_answer_line(answer, answer_format)}" if body else final_answer_line(answer, answer_format)
            if max_solution_chars is not None and len(solution) > max_solution_chars:
                continue
            user = f"{question}\n\n{FORMAT_INSTRUCTIONS[answer_format]}" if format_instruction else question
            user = prompt_template.format(question=user)
            prompt = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
                {"role": "user", "content": user}
            ]
            rows.append(
                {
                    "prompt": prompt,
                    "completion": [{"role": "assistant", "content": solution}],
                    "question": question,
                    "solution": solution,
                    "answer": answer,
                    "task": task,
                }
            )
            if len(rows) == n:
                break
        # rounds that find no question not seen before mean the task's question space is exhausted
        stale_rounds = stale_rounds + 1 if len(seen) == seen_before else 0
    return Dataset.from_list(rows)


_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}


def load_sft_dataset(name_or_path: str, split: str = "train", **kwargs):
    """Load an SFT dataset from wherever it lives, as a `datasets.Dataset`:

    - a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (``split`` picks from a dict);
    - a local ``.json``, ``.jsonl``, ``.parquet``, ``.csv`` or ``.arrow`` file (its only split is ``"train"``);
    - a local folder of such files (loaded with ``datasets.load_dataset(folder)``);
    - ``"reasoning-gym:TASK[:N]"``: ``N`` (default 1000) offline problems from `math_word_problems` for ``split``;
    - otherwise a Hugging Face Hub dataset name (``kwargs`` go to ``datasets.load_dataset``).
    """
    import datasets

    text = str(name_or_path)
    if text.startswith("reasoning-gym:"):
        parts = text.split(":")
        if len(parts) not in (2, 3) or parts[1] not in TASKS or (len(parts) == 3 and not parts[2].isdigit()):
            raise ValueError(f"{text!r}: write 'reasoning-gym:TASK' or 'reasoning-gym:TASK:N' with TASK in {list(TASKS)}.")
        return math_word_problems(int(parts[2]) if len(parts) == 3 else 1000, task=parts[1], split=split, **kwargs)

    path = Path(text).expanduser()
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "dataset_info.json").is_file() or (path / "state.json").is_file():
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise ValueError(f"{path} holds the splits {list(loaded)}, not {split!r}: pass one of them as the split.")
                return loaded[split]
            return loaded
        try:
            loaded = datasets.load_dataset(str(path), **kwargs)
        except Exception as err:  # noqa: BLE001 - re-raised with what was tried
            raise ValueError(
                f"{path} is a folder but neither a saved dataset (save_to_disk) nor a folder of data files "
                f"datasets can read: {err}"
            ) from err
        if split not in loaded:
            raise ValueError(f"{path} holds the splits {list(loaded)}, not {split!r}: pass one of them as the split.")
        return loaded[split]
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix not in _FILE_BUILDERS:
            raise ValueError(f"{path}: unsupported file type {suffix!r}; use one of {sorted(_FILE_BUILDERS)} or a saved dataset folder.")
        if split != "train":
            raise ValueError(f"{path} is a single file, whose only split is 'train' (asked for {split!r}).")
        from trl_onpolicy.utils.validation import check_text_file

        check_text_file(path)  # non-UTF-8 bytes (file and line named) or no rows at all: a message, not a traceback
        try:
            return datasets.load_dataset(_FILE_BUILDERS[suffix], data_files=str(path), split="train", **kwargs)
        except Exception as err:  # noqa: BLE001 - malformed JSON/CSV/Parquet: name the file
            cause = err.__cause__ or err
            detail = " ".join(str(cause).split())[:300]
            raise ValueError(f"dataset file {str(path)!r} could not be read as {suffix[1:]}: {type(cause).__name__}: {detail}") from err

    looks_local = text.startswith((".", "/", "~")) or path.suffix.lower() in _FILE_BUILDERS or text.count("/") > 1
    if looks_local:
        raise FileNotFoundError(f"Dataset {text!r} does not exist: no such file or folder (resolved to {path.resolve()}).")
    try:
        return datasets.load_dataset(text, split=split, **kwargs)
    except Exception as err:  # noqa: BLE001 - explain the three places that were tried
        raise ValueError(
            f"Could not load dataset {text!r}: it is not a local file or folder, and loading it from the Hugging Face "
            f"Hub failed ({type(err).__name__}: {err}). Check the name, or pass a local json/jsonl/parquet/csv file "
            "or a folder saved with save_to_disk."
        ) from err
