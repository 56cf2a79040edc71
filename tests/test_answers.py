"""Answer extraction and checking on tricky responses."""

from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction

import pytest

from trl_onpolicy.eval.answers import (
    check_answer,
    contains_any,
    extract_answer,
    extract_boxed,
    extract_boxed_all,
    extract_hash,
    extract_last_number,
    gold_answer,
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
        ("\\$1,200", Fraction(1200)),
        ("18 \\text{ cm}", Fraction(18)),
        ("18 cm", Fraction(18)),
        ("30^\\circ", Fraction(30)),
        ("50\\%", Fraction(50)),
        ("\u22125", Fraction(-5)),
        ("0.25", Fraction(1, 4)),
        ("abc", None),
        # an expression is not a number, whatever number it starts with
        ("2\\sqrt{3}", None),
        ("12x", None),
        ("(2, 3)", None),
        ("3+\\sqrt{5}", None),
        ("x^2+1", None),
        ("[1, 3)", None),
    ],
)
def test_to_number_reads_one_whole_number(text, value):
    assert to_number(text) == value


# (kind, gold, a correct response, a wrong response): golds as datasets write them (short answers, GSM8K "#### N"
# solutions, MATH-style solutions with several boxes). The verdicts are what a person grading by hand would say;
# where the gold is short and the response has one box, math-verify's own verdict on the boxed gold agrees
# (checked in test_reference_verdicts_agree_with_math_verify).
CASES = [
    ("tuple", "(2, 3)", "The point is \\boxed{(2, 3)}.", "\\boxed{2}"),
    ("tuple", "(1, -4)", "So $(x, y) = \\boxed{(1,-4)}$", "\\boxed{(-4, 1)}"),
    ("interval closed", "[1, 3]", "\\boxed{[1,3]}", "\\boxed{[1, 3)}"),
    ("interval open", "(0, \\infty)", "x \\in \\boxed{(0, \\infty)}", "\\boxed{[0, \\infty)}"),
    ("interval half-open", "[-2, 5)", "\\boxed{[-2,5)}", "\\boxed{(-2, 5)}"),
    ("set", "\\{1, 2, 3\\}", "\\boxed{\\{3, 2, 1\\}}", "\\boxed{\\{1, 2\\}}"),
    ("roots list", "-1, 4", "The roots are \\boxed{4, -1}", "\\boxed{-1, 3}"),
    ("radical", "2\\sqrt{3}", "\\boxed{\\sqrt{12}}", "\\boxed{2}"),
    ("radical", "3+\\sqrt{5}", "\\boxed{\\sqrt{5}+3}", "\\boxed{3}"),
    ("radical fraction", "\\frac{\\sqrt{2}}{2}", "\\boxed{\\frac{1}{\\sqrt{2}}}", "\\boxed{\\sqrt{2}}"),
    ("pi", "4\\pi", "The area is \\boxed{4\\pi}.", "\\boxed{4}"),
    ("pi", "\\frac{\\pi}{3}", "\\boxed{\\pi/3}", "\\boxed{\\frac{\\pi}{6}}"),
    ("polynomial", "x^2+1", "\\boxed{1 + x^2}", "\\boxed{2}"),
    ("polynomial", "12x", "\\boxed{12x}", "\\boxed{12}"),
    ("polynomial", "(x-1)(x+2)", "\\boxed{x^2 + x - 2}", "\\boxed{x^2 - x - 2}"),
    ("latex fraction vs decimal", "0.75", "so \\boxed{\\frac{3}{4}}", "so \\boxed{\\frac{3}{5}}"),
    ("latex fraction vs decimal", "\\frac{1}{2}", "x = 1/2", "x = 1/3"),
    ("latex fraction vs decimal", "\\dfrac{7}{8}", "\\boxed{0.875}", "\\boxed{0.87}"),
    ("percentage", "50\\%", "\\boxed{50\\%}", "\\boxed{5\\%}"),
    ("percentage", "25", "The discount is \\boxed{25\\%}.", "The discount is \\boxed{20\\%}."),
    ("units", "18", "\\boxed{18 \\text{ cm}}", "\\boxed{81 \\text{ cm}}"),
    ("units", "18", "The answer is 18 cm.", "The answer is 17 cm."),
    ("units word", "5", "\\boxed{5 dollars}", "\\boxed{6 dollars}"),
    ("units", "60", "#### 60 minutes", "#### 6 minutes"),
    ("currency", "18", "It costs $18.", "It costs $19."),
    ("currency", "\\$2.50", "\\boxed{2.50}", "\\boxed{25}"),
    ("currency", "1200", "\\boxed{\\$1,200}", "\\boxed{\\$12,000}"),
    ("degrees", "30^\\circ", "\\boxed{30}", "\\boxed{60^\\circ}"),
    ("degrees", "90", "The angle is \\boxed{90^\\circ}.", "The angle is \\boxed{9^\\circ}."),
    ("thousands", "1234", "The answer is 1,234 apples.", "The answer is 1,243 apples."),
    ("thousands", "1000000", "#### 1,000,000", "#### 100,000"),
    ("thousands", "1,234,567", "\\boxed{1234567}", "\\boxed{1234}"),
    ("negative", "-5", "#### -5", "#### 5"),
    ("negative", "-\\frac{3}{4}", "\\boxed{-0.75}", "\\boxed{0.75}"),
    ("negative", "-12", "The change is \\boxed{-12}.", "The change is \\boxed{12}."),
    ("gsm hash gold", "Tom has 3 + 4 = 7 apples.\n#### 7", "3 + 4 = 7\n#### 7", "3 + 5 = 8\n#### 8"),
    ("gsm hash gold", "48/2 = 24 clips in May.\n48+24 = 72\n#### 72", "She sold \\boxed{72} clips.", "She sold \\boxed{24} clips."),
    ("full-solution gold", "First 3x+5=20, so 3x=15 and x=\\boxed{5}.", "\\boxed{5}", "\\boxed{3}"),
    ("full-solution gold", "Try \\boxed{1} first; no. The answer is \\boxed{\\frac{2}{3}}.", "\\boxed{2/3}", "\\boxed{1}"),
    ("full-solution gold", "The sum is $2+3$, i.e. \\boxed{(2, 3)} as a pair.", "\\boxed{(2,3)}", "\\boxed{2}"),
    ("last box wins", "5", "first \\boxed{2} then \\boxed{5}", "first \\boxed{5} then \\boxed{2}"),
    ("equation answer", "3", "\\boxed{x = 3}", "\\boxed{x = 4}"),
    ("matrix-free vector", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\boxed{\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}}", "\\boxed{\\begin{pmatrix} 2 \\\\ 1 \\end{pmatrix}}"),
    ("no answer", "3", "\\boxed{3}", "I do not know."),
    ("no answer", "0", "The answer is \\boxed{0}.", ""),
    ("text gold", "\\text{(B)}", "\\boxed{\\text{(B)}}", "\\boxed{\\text{(C)}}"),
]


def _mv_verdict(gold: str, response: str) -> bool:
    """math-verify's own verdict on the boxed gold and the raw response (independent of trl_onpolicy.eval.answers)."""
    from math_verify import parse, verify

    return bool(verify(parse("\\boxed{" + gold + "}"), parse(response)))


_GRADED = [(kind, gold, right, True) for kind, gold, right, _ in CASES] + [
    (kind, gold, wrong, False) for kind, gold, _, wrong in CASES
]


@pytest.mark.parametrize("kind, gold, response, correct", _GRADED, ids=[f"{c[0]}-{c[3]}-{i}" for i, c in enumerate(_GRADED)])
def test_grade_response_real_answer_mix(kind, gold, response, correct):
    extracted, ok = grade_response(response, gold)
    assert ok is correct, (kind, gold, response, extracted)


def test_reference_verdicts_agree_with_math_verify():
    assert len(CASES) >= 40
    checked = 0
    for kind, gold, right, wrong in CASES:
        if "####" in gold or "\\boxed" in gold or "dollars" in right:  # full solutions and word units: see above
            continue
        for response, correct in ((right, True), (wrong, False)):
            if response.count("\\boxed") == 1:
                assert _mv_verdict(gold, response) is correct, (gold, response)
                checked += 1
    assert checked >= 50


@pytest.mark.parametrize(
    "response, gold",
    # the cases the first-number fallback used to pass: math-verify parses both sides and says "not equal"
    [("\\boxed{2}", "(2, 3)"), ("\\boxed{2}", "x^2+1"), ("\\boxed{2}", "2\\sqrt{3}"), ("\\boxed{[1,3]}", "[1, 3)"),
     ("\\boxed{12x}", "12"), ("\\boxed{3}", "3+\\sqrt{5}")],
)
def test_math_verify_verdict_is_final(response, gold):
    assert grade_response(response, gold) == (extract_boxed(response), False)
    assert not numeric_equal(extract_boxed(response), gold)


def test_full_solution_gold_is_reduced_to_its_final_answer():
    solution = "3x + 5 = 20, so 3x = 15.\nTry \\boxed{3}? No: x = \\boxed{5}."
    assert gold_answer(solution) == "5"
    assert gold_answer("Natalia sold 48/2 = 24 clips.\n#### 72") == "72"
    assert gold_answer("(2, 3)") == "(2, 3)"
    assert grade_response("\\boxed{5}", solution)[1] and not grade_response("\\boxed{3}", solution)[1]
    # without the reduction, "3" would be compared with the whole text (math-verify reads its first number)
    assert not grade_response("The answer is 3.", solution)[1]


def test_numeric_fallback_only_when_math_verify_cannot_parse(monkeypatch):
    import math_verify

    calls = []
    real_parse = math_verify.parse

    def parse_nothing_for_gold(text, **kwargs):
        calls.append(text)
        return [] if "gold" in text else real_parse(text, **kwargs)

    monkeypatch.setattr(math_verify, "parse", parse_nothing_for_gold)
    # math-verify cannot parse the gold: the whole-number comparison decides (and never takes a first number)
    assert math_verify_equal("18", "gold") is False
    assert calls
    monkeypatch.setattr(math_verify, "parse", lambda text, **kw: [])
    assert math_verify_equal("1,234", "1234") is True
    assert math_verify_equal("2\\sqrt{3}", "2") is False
    assert math_verify_equal("12x", "12") is False


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
    assert make_checker("trl_onpolicy.eval.answers:numeric_equal") is numeric_equal
    with pytest.raises(ValueError, match="Unknown checker"):
        make_checker("nope")
    with pytest.raises(ValueError, match="could not be imported"):
        make_checker("trl_onpolicy.eval.answers:missing_function")
    assert grade_response("The capital is Paris, I think.", "Paris", checker="contains")[1]
