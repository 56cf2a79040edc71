"""Answer extraction and checking on tricky responses."""

from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction

import pytest

from trl_onpolicy.answers import (
    check_answer,
    contains_any,
    extract_answer,
    extract_boxed,
    extract_boxed_all,
    extract_hash,
    extract_last_number,
    grade_response,
    make_checker,
    math_verify_equal,
    numeric_equal,
    to_number,
)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so the answer is \\boxed{42}.", "42"),
        ("\\boxed{\\frac{3}{4}}", "\\frac{3}{4}"),
        ("nested \\boxed{\\frac{\\sqrt{2}}{2}} end", "\\frac{\\sqrt{2}}{2}"),
        ("first \\boxed{1} then \\boxed{2}", "2"),  # several boxes: the last one is the answer
        ("\\boxed{7} and an unclosed \\boxed{8", "7"),  # unclosed box ignored
        ("\\fbox{5}", "5"),
        ("no box here", None),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


def test_extract_boxed_all_keeps_order():
    assert extract_boxed_all("\\boxed{a} x \\boxed{{b}} y \\boxed{c}") == ["a", "{b}", "c"]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("3 + 4 = 7\n#### 7", "7"),
        ("#### 1,234 dollars.", "1,234"),
        ("#### -5\n", "-5"),
        ("#### 3 \n then more text\n#### 9", "9"),
        ("no marker 12", None),
    ],
)
def test_extract_hash(text, expected):
    assert extract_hash(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("He has 3 apples, then 12.", "12"),
        ("The total is 1,234,567 units", "1,234,567"),
        ("the result is -17", "-17"),
        ("x = -3/4 in the end", "-3/4"),
        ("pi is about 3.14.", "3.14"),
        ("list 1, 2, 3", "3"),
        ("a2b has no standalone number", None),
        ("nothing", None),
    ],
)
def test_extract_last_number(text, expected):
    assert extract_last_number(text) == expected


def test_extract_answer_order_is_configurable():
    text = "step 1: 5 + 5 = 10\n#### 10\nso \\boxed{11} and finally 12"
    assert extract_answer(text) == "11"
    assert extract_answer(text, ["hash", "boxed"]) == "10"
    assert extract_answer(text, ["last_number"]) == "12"
    assert extract_answer(text, "hash") == "10"
    assert extract_answer("no answer at all") is None
    with pytest.raises(ValueError, match="Unknown answer extractor"):
        extract_answer(text, ["boxes"])


@pytest.mark.parametrize(
    "text, value",
    [
        ("1,234", Fraction(1234)),
        ("-3/4", Fraction(-3, 4)),
        ("\\frac{3}{4}", Fraction(3, 4)),
        ("\\dfrac{-1}{8}", Fraction(-1, 8)),
        ("$18", Fraction(18)),
        ("18 \\text{ cm}", Fraction(18)),
        ("\u22125", Fraction(-5)),
        ("0.25", Fraction(1, 4)),
        ("abc", None),
    ],
)
def test_to_number(text, value):
    assert to_number(text) == value


@pytest.mark.parametrize(
    "response, gold, correct",
    [
        ("so \\boxed{\\frac{3}{4}}", "0.75", True),  # LaTeX fraction vs decimal
        ("so \\boxed{\\frac{3}{4}}", "3/4", True),
        ("so \\boxed{\\frac{3}{4}}", "0.7", False),
        ("x = 1/2", "\\frac{1}{2}", True),  # plain fraction vs LaTeX gold
        ("first \\boxed{2} then \\boxed{5}", "5", True),  # last box wins
        ("first \\boxed{5} then \\boxed{2}", "5", False),
        ("The answer is 1,234 apples.", "1234", True),  # thousands separator
        ("#### 1,000,000", "1000000", True),
        ("It costs $18.", "18", True),  # currency
        ("\\boxed{18 \\text{ cm}}", "18", True),  # units
        ("The answer is 18 cm.", "18", True),
        ("#### -5", "-5", True),  # negative
        ("#### 5", "-5", False),
        ("I do not know.", "3", False),  # no answer
        ("", "0", False),
        ("\\boxed{0.5}", "1/2", True),
    ],
)
def test_grade_response(response, gold, correct):
    extracted, ok = grade_response(response, gold)
    assert ok is correct, (extracted, gold)
    # the pure-Python numeric checker agrees on every case with a plain number gold (independent of math-verify)
    if extracted is not None and "\\" not in extracted and "\\" not in gold and "text" not in extracted:
        assert numeric_equal(extracted, gold) is correct


def test_math_verify_in_worker_threads():
    # math-verify's default timeouts use signal.alarm, which only works in the main thread
    cases = [("\\frac{3}{4}", "0.75", True), ("1,234", "1234", True), ("7", "8", False)] * 4
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda c: math_verify_equal(c[0], c[1]), cases))
    assert results == [c[2] for c in cases]


def test_checkers_and_errors():
    assert contains_any("The capital of France is Paris.", "Paris")
    assert contains_any("It is Beijing.", "Beijing|Peking")
    assert not contains_any("Bees make honeycomb.", "honey")  # whole words only
    assert check_answer("Paris", "paris", checker="exact")
    assert check_answer("7", "7.0", checker="numeric")
    assert check_answer("x", "y", checker=lambda p, g: True)
    assert make_checker("trl_onpolicy.answers:numeric_equal") is numeric_equal
    with pytest.raises(ValueError, match="Unknown checker"):
        make_checker("nope")
    with pytest.raises(ValueError, match="could not be imported"):
        make_checker("trl_onpolicy.answers:missing_function")
    assert grade_response("The capital is Paris, I think.", "Paris", checker="contains")[1]
