"""Preference-pair construction with a stub generator whose outputs are controlled, so every count is exact."""

import pytest

from trl_onpolicy.eval.answers import grade_response
from trl_onpolicy.eval.preferences import PairConfig, build_preference_pairs, corrupt_answer, model_generate_fn


def _row(i, answer, reference=None):
    return {
        "prompt": [{"role": "user", "content": f"problem {i}"}],
        "completion": [{"role": "assistant", "content": reference or f"work\n#### {answer}"}],
        "answer": answer,
    }


ROWS = [
    _row(0, "3"),  # samples: all correct -> no incorrect sample
    _row(1, "5"),  # samples: one wrong -> that one is rejected
    _row(2, "7", reference="wrong reference\n#### 8"),  # reference fails the checker -> dropped before sampling
    _row(3, "-2"),  # samples: two wrong -> the first wrong one is rejected
    _row(4, "10"),  # samples: all correct in round 0, wrong in round 1 (for "resample")
]


class StubGenerator:
    """Round 0: scripted per prompt; later rounds: everything wrong. Records the prompts it was asked for."""

    def __init__(self):
        self.calls = []

    def __call__(self, prompts, k, round_index):
        self.calls.append(([p[0]["content"] for p in prompts], k, round_index))
        script = {
            "problem 0": ["#### 3", "\\boxed{3}", "3"],
            "problem 1": ["#### 5", "#### 6", "#### 5"],
            "problem 2": ["#### 8", "#### 7", "#### 7"],
            "problem 3": ["#### 2", "#### -2", "the answer is 4"],
            "problem 4": ["#### 10", "10", "\\boxed{10}"],
        }
        out = []
        for p in prompts:
            key = p[0]["content"]
            out.append(script[key] if round_index == 0 else [f"round {round_index} says 999"] * k)
        return out


def test_drop_counts_exactly():
    gen = StubGenerator()
    pairs, stats = build_preference_pairs(ROWS, gen, PairConfig(num_samples=3, on_no_incorrect="drop"))
    assert [c[0] for c in gen.calls] == [["problem 0", "problem 1", "problem 3", "problem 4"]]  # row 2 never sampled
    assert stats["reference_incorrect"] == 1
    assert stats["samples_drawn"] == 12
    assert stats["samples_incorrect"] == 3  # "#### 6", "#### 2", "the answer is 4"
    assert stats["no_incorrect_sample"] == 2 and stats["dropped_no_incorrect"] == 2
    assert stats["num_pairs"] == 2 == len(pairs)
    assert [p["prompt"][0]["content"] for p in pairs] == ["problem 1", "problem 3"]
    assert pairs[0]["rejected"] == [{"role": "assistant", "content": "#### 6"}]
    assert pairs[1]["rejected"][0]["content"] == "#### 2"  # the first wrong sample
    assert pairs[0]["chosen"] == ROWS[1]["completion"]
    for p in pairs:  # TRL conversational preference format
        assert set(p) == {"prompt", "chosen", "rejected"}
        assert p["prompt"][0]["role"] == "user" and p["chosen"][0]["role"] == p["rejected"][0]["role"] == "assistant"


def test_resample_pairs_the_remaining_prompts():
    gen = StubGenerator()
    pairs, stats = build_preference_pairs(ROWS, gen, PairConfig(num_samples=3, on_no_incorrect="resample", max_resample_rounds=2))
    assert [c[0] for c in gen.calls] == [["problem 0", "problem 1", "problem 3", "problem 4"], ["problem 0", "problem 4"]]
    assert gen.calls[1][2] == 1
    assert stats["no_incorrect_sample"] == 2 and stats["resampled_paired"] == 2 and stats["dropped_no_incorrect"] == 0
    assert [p["prompt"][0]["content"] for p in pairs] == ["problem 0", "problem 1", "problem 3", "problem 4"]
    assert pairs[0]["rejected"][0]["content"] == "round 1 says 999"


def test_corrupt_fallback_makes_a_wrong_answer():
    pairs, stats = build_preference_pairs(ROWS, StubGenerator(), PairConfig(num_samples=3, on_no_incorrect="corrupt"))
    assert stats["corrupted"] == 2 and stats["num_pairs"] == 4
    by_prompt = {p["prompt"][0]["content"]: p for p in pairs}
    for key, gold in (("problem 0", "3"), ("problem 4", "10")):
        rejected = by_prompt[key]["rejected"][0]["content"]
        assert grade_response(rejected, gold)[1] is False
        assert rejected.startswith("work\n")  # the rest of the reference is kept
    assert grade_response(corrupt_answer("so \\boxed{12} done", "12"), "12")[1] is False
    assert grade_response(corrupt_answer("no answer", "4"), "4")[1] is False


def test_keep_unchecked_reference_and_errors():
    pairs, stats = build_preference_pairs(
        ROWS, StubGenerator(), PairConfig(num_samples=3, require_correct_reference=False)
    )
    assert stats["reference_incorrect"] == 0  # row 2 is now sampled too
    assert stats["num_pairs"] == 3 and pairs[1]["prompt"][0]["content"] == "problem 2"
    assert pairs[1]["chosen"][0]["content"].startswith("wrong reference") and pairs[1]["rejected"][0]["content"] == "#### 8"
    with pytest.raises(ValueError, match="on_no_incorrect"):
        PairConfig(on_no_incorrect="skip")
    with pytest.raises(ValueError, match="temperature"):
        PairConfig(temperature=0.0)
    with pytest.raises(ValueError, match="`answer` column"):
        build_preference_pairs([{"prompt": "p", "completion": "c"}], StubGenerator())


def test_generate_fn_samples_k_per_prompt_with_the_evaluation_sampler(tiny_model):
    model, tok = tiny_model
    fn = model_generate_fn(model, tok, PairConfig(num_samples=2, max_new_tokens=4, batch_size=4), progress=False)
    out = fn([[{"role": "user", "content": "hi"}], [{"role": "user", "content": "1 + 1?"}]], 3, 0)
    assert [len(x) for x in out] == [3, 3] and all(isinstance(t, str) for x in out for t in x)
    assert out == fn([[{"role": "user", "content": "hi"}], [{"role": "user", "content": "1 + 1?"}]], 3, 0)  # seeded


def test_pairs_cli_on_tiny_model(tiny_model_dir, tmp_path):
    import json

    from datasets import load_from_disk

    from trl_onpolicy.eval.preferences import main

    data = tmp_path / "sft.jsonl"
    data.write_text("\n".join(json.dumps(_row(i, str(i + 2))) for i in range(3)))
    out = tmp_path / "pairs"
    rc = main(["--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(data), "--output_dir", str(out),
               "--num_samples", "2", "--max_new_tokens", "4", "--on_no_incorrect", "corrupt"])
    assert rc == 0
    pairs = load_from_disk(str(out))
    stats = json.loads((out / "pairs_stats.json").read_text())
    assert len(pairs) == stats["num_pairs"] == 3  # every prompt paired: own wrong sample or corrupted reference
    assert stats["samples_drawn"] == 6 and set(pairs.column_names) == {"prompt", "chosen", "rejected"}
