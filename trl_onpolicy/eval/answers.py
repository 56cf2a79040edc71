"""Final-answer extraction and checking for math-style responses: THE grader of the project.

Every verdict on a math answer (`trl-onpolicy eval` and `compare`, the `realign` filters, online Hinted Decoding's
acceptance, `pairs`) goes through `grade_response(response, gold)`:

1. The gold is reduced to its final answer (`gold_answer`): a full solution gives its last ``\\boxed{}``, else what
   follows its last ``#### `` marker; a short gold (``"3/4"``, ``"(2, 3)"``) is used whole.
2. The response's answer is extracted the same way (`extract_answer`, ``order=("boxed", "hash", "last_number")``):
   the content of the LAST ``\\boxed{...}`` / ``\\fbox{...}`` (nested braces kept whole), else what follows the last
   ``#### `` marker (GSM8K style), else the last number in the text (signs, thousands separators, decimals and
   ``a/b`` fractions understood). No answer found: incorrect.
3. The two answers are compared by `math_verify_equal`: math-verify (``verify(parse(gold), parse(pred))``) decides
   whenever it parses both sides, "not equal" included; only when it cannot parse one side does `numeric_equal`
   compare them, each as ONE whole number (``"2\\sqrt{3}"`` is not the number 2). Its ``signal.alarm`` timeouts are
   switched off outside the main thread (they only work there).

`make_checker(spec)` gives a ``checker(prediction: str | None, gold: str) -> bool`` from a name (``"math_verify"``,
``"numeric"``, ``"exact"``, ``"contains"``) or an importable ``"module:function"``; a callable passes through. The
checker replaces step 3 only.
"""

from __future__ import annotations

import importlib
import math
import re
import threading
from fractions import Fraction
from typing import Callable, Iterable, Sequence

EXTRACTORS = ("boxed", "hash", "last_number")
Checker = Callable[[str | None, str], bool]

# a number: optional sign, digits with optional thousands groups (1,234,567) or plain digits, optional decimals,
# optionally a fraction a/b; also a bare decimal like .5
_NUM = r"[-\u2212+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+(?:\.\d+)?)?|[-\u2212+]?\.\d+"
_NUMBER_RE = re.compile(rf"(?<![\w.])(?:{_NUM})(?![\d])")
_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_HASH_RE = re.compile(r"####\s*(.+)")


def extract_boxed_all(text: str) -> list[str]:
    """Contents of every ``\\boxed{...}`` (and ``\\fbox{...}``) in ``text``, braces balanced; unclosed boxes skipped."""
    out = []
    for match in _BOX_RE.finditer(text):
        depth, start = 1, match.end()
        for i in range(start, len(text)):
            ch = text[i]
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
                if depth == 0:
                    out.append(text[start:i].strip())
                    break
    return out


def extract_boxed(text: str) -> str | None:
    """The last complete ``\\boxed{...}`` content (a model's final box is its answer), or ``None``."""
    boxes = extract_boxed_all(text)
    return boxes[-1] if boxes else None


def extract_hash(text: str) -> str | None:
    """What follows the last ``####`` marker (GSM8K's answer line), up to the end of that line, or ``None``."""
    hits = _HASH_RE.findall(text)
    if not hits:
        return None
    answer = hits[-1].strip()
    # "#### 1,234 dollars." -> keep the number when the line starts with one
    number = _NUMBER_RE.match(answer)
    return number.group(0).strip() if number else (answer.rstrip(".") or None)


def extract_last_number(text: str) -> str | None:
    """The last number in ``text`` (e.g. ``-1,234.5`` or ``3/4``), or ``None``."""
    hits = _NUMBER_RE.findall(text)
    return hits[-1].strip() if hits else None


_EXTRACTOR_FUNCS = {"boxed": extract_boxed, "hash": extract_hash, "last_number": extract_last_number}


def extract_answer(text: str | None, order: Sequence[str] = EXTRACTORS) -> str | None:
    """First answer found by the extractors in ``order`` (names from `EXTRACTORS`), or ``None`` when none matches."""
    if text is None:
        return None
    if isinstance(order, str):
        order = [order]
    for name in order:
        if name not in _EXTRACTOR_FUNCS:
            raise ValueError(f"Unknown answer extractor {name!r}; choose from {list(EXTRACTORS)}.")
        answer = _EXTRACTOR_FUNCS[name](text)
        if answer:
            return answer
    return None


_UNIT_WORDS_RE = re.compile(r"^(?P<num>[-\u2212+]?\$?\s*[\d.,/]+)\s+(?:[A-Za-z]{2,}\.?\s*)+$")


def strip_units(answer: str) -> str:
    """``answer`` without a trailing plain-word unit after a number (``"5 dollars"`` -> ``"5"``, ``"18 cm."`` ->
    ``"18"``); anything else is returned unchanged (``"12x"`` and ``"x^2 + 1"`` stay whole)."""
    match = _UNIT_WORDS_RE.match(answer.strip())
    return match.group("num").strip() if match else answer


def gold_answer(gold: str) -> str:
    """The final answer of a gold: a gold that is a full solution is reduced to its LAST ``\\boxed{}`` content,
    else to what follows its last ``#### `` marker (GSM8K); a gold with neither (``"3/4"``, ``"(2, 3)"``) is used
    whole."""
    gold = str(gold)
    for extractor in (extract_boxed, extract_hash):
        found = extractor(gold)
        if found:
            return found
    return gold.strip()


# currency, percent and degree signs and spacing commands around a number (longest first)
_DECORATIONS = ("\\$", "$", "\\%", "%", "^{\\circ}", "^\\circ", "\\circ", "\\!", "\\,", "\\;", "\\ ", "\\left", "\\right")


def to_number(text: str | None) -> Fraction | None:
    """Exact value of an answer that is ONE plain number, else ``None``.

    Understood around the number: a sign (also ``\u2212``), thousands separators (``1,234``), decimals, ``a/b`` and
    ``\\frac{a}{b}``, currency (``$``, ``\\$``), a trailing percent (``50%`` is 50, as math-verify reads a bare
    percentage), degrees (``^\\circ``), ``\\text{...}`` units and trailing plain-word units (``18 cm``). Anything else
    left over (``2\\sqrt{3}``, ``12x``, ``(2, 3)``, ``3+\\sqrt{5}``) means the answer is not one number: ``None``.
    """
    if text is None:
        return None
    s = str(text).strip().replace("\u2212", "-")
    s = re.sub(r"\\(?:text|textbf|mathrm|mbox)\s*\{[^{}]*\}", " ", s)
    s = re.sub(r"\\[dt]?frac\s*\{([^{}]+)\}\s*\{([^{}]+)\}", r"\1/\2", s)
    for junk in _DECORATIONS:
        s = s.replace(junk, " ")
    s = strip_units(s.strip().rstrip("."))
    s = re.sub(r"\s+", "", s)
    if not re.fullmatch(rf"(?:{_NUM})", s):
        return None
    s = s.replace(",", "").replace("\u2212", "-")
    try:
        if "/" in s:
            num, den = s.split("/")
            return Fraction(num) / Fraction(den)
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def numeric_equal(prediction: str | None, gold: str, rel_tol: float = 1e-6) -> bool:
    """Whether both answers are each ONE number (see `to_number`) and equal (fractions exact, decimals to
    ``rel_tol``). An expression is never reduced to its first number: ``numeric_equal("2\\sqrt{3}", "2")`` is False."""
    a, b = to_number(prediction), to_number(gold)
    if a is None or b is None:
        return False
    return a == b or math.isclose(float(a), float(b), rel_tol=rel_tol, abs_tol=1e-9)


def _wrap_for_parse(answer: str) -> str:
    # math-verify reads LaTeX inside $...$ or \boxed{}; a bare extracted answer is boxed so that "\frac12" and
    # "18 \text{cm}" parse like they would inside a final box
    answer = strip_units(answer.strip())
    if answer.startswith("$") or "\\boxed" in answer:
        return answer
    return f"\\boxed{{{answer}}}"


def math_verify_equal(prediction: str | None, gold: str) -> bool:
    """THE answer comparison: ``math_verify.verify(parse(gold), parse(prediction))`` decides whenever math-verify
    parses both sides (its verdict stands, "not equal" included); only when it cannot parse one side (or is not
    installed, or raises) does `numeric_equal` compare the two answers, each as one whole number. Both sides are
    final answers (see `grade_response` for extraction); a trailing word unit is dropped first (``"5 dollars"``).
    Safe in worker threads (math-verify's ``signal.alarm`` timeouts are disabled off the main thread)."""
    if prediction is None:
        return False
    try:
        from math_verify import parse, verify
    except ImportError:  # pragma: no cover - math-verify is a declared dependency of the demo/dev extras
        return numeric_equal(prediction, gold)
    kwargs = {}
    if threading.current_thread() is not threading.main_thread():
        kwargs = {"parsing_timeout": None}
    try:
        gold_parsed = parse(_wrap_for_parse(gold), **kwargs)
        pred_parsed = parse(_wrap_for_parse(prediction), **kwargs)
        if gold_parsed and pred_parsed:
            verify_kwargs = {"timeout_seconds": None} if kwargs else {}
            return bool(verify(gold_parsed, pred_parsed, **verify_kwargs))
    except Exception:  # noqa: BLE001 - math-verify raises on exotic input: the whole-number comparison decides
        pass
    return numeric_equal(prediction, gold)


def _normalize_text(s: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"[^\w\s]", " ", s.lower())).strip()


def exact_equal(prediction: str | None, gold: str) -> bool:
    """Case-, punctuation- and whitespace-insensitive string equality."""
    return prediction is not None and _normalize_text(prediction) == _normalize_text(gold)


def contains_any(prediction: str | None, gold: str | Iterable[str]) -> bool:
    """True when any accepted answer (``gold``: a string with ``|``-separated alternatives, or a list) appears as
    whole words in ``prediction`` (case- and punctuation-insensitive). Used by short factual sets."""
    if prediction is None:
        return False
    alternatives = gold.split("|") if isinstance(gold, str) else list(gold)
    text = f" {_normalize_text(prediction)} "
    return any(f" {_normalize_text(alt)} " in text for alt in alternatives if _normalize_text(alt))


CHECKERS: dict[str, Checker] = {
    "math_verify": math_verify_equal,
    "numeric": numeric_equal,
    "exact": exact_equal,
    "contains": contains_any,
}


def make_checker(spec: str | Checker | None = "math_verify") -> Checker:
    """A checker from a name in `CHECKERS`, an importable ``"package.module:function"``, or a callable."""
    if spec is None:
        return math_verify_equal
    if callable(spec):
        return spec
    if spec in CHECKERS:
        return CHECKERS[spec]
    if ":" in spec:
        module, _, name = spec.partition(":")
        try:
            func = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"Checker {spec!r} could not be imported ({err}).") from err
        if not callable(func):
            raise ValueError(f"Checker {spec!r} is not callable.")
        return func
    raise ValueError(f"Unknown checker {spec!r}; use one of {sorted(CHECKERS)} or 'package.module:function'.")


def check_answer(prediction: str | None, gold: str, checker: str | Checker | None = "math_verify") -> bool:
    """Whether the extracted ``prediction`` matches ``gold`` under ``checker`` (default math-verify)."""
    return bool(make_checker(checker)(prediction, gold))


def grade_response(
    response: str, gold: str, *, order: Sequence[str] = EXTRACTORS, checker: str | Checker | None = "math_verify"
) -> tuple[str | None, bool]:
    """Grade a full model ``response`` against ``gold``: ``(extracted answer, correct)``.

    ``gold`` may be a short answer (``"3/4"``) or a full reference solution: a solution is first reduced to its final
    answer, its LAST ``\\boxed{}`` content, else what follows its last ``#### `` marker (`gold_answer`). The response's
    answer is extracted by ``order`` (`extract_answer`: last box, then ``####``, then last number) and compared by
    ``checker`` (default: math-verify's verdict whenever it parses both sides, else one whole-number comparison; see
    `math_verify_equal`). A response with no answer is incorrect. A ``"contains"`` checker sees the whole response and
    the gold's alternatives unchanged (factual sets have no box or number)."""
    check = make_checker(checker)
    if check is contains_any:
        return response.strip().split("\n")[0][:200], contains_any(response, gold)
    extracted = extract_answer(response, order)
    if extracted is None:
        return None, False
    return extracted, bool(check(extracted, gold_answer(gold)))
