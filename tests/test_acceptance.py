"""Offline (`realign` filters) and online (`HintedDataCollator`) re-alignment accept responses by ONE rule
(`trl_onpolicy.hinted.realign.accept_response`): finished with EOS, and the final answer correct against the answer column or,
without one, against the reference solution's final answer. Both paths are run on the same rows and responses."""

import json
from pathlib import Path

from datasets import Dataset

import trl_onpolicy.hinted.decoding as hinted_module
import trl_onpolicy.hinted.realign as realign_module
from trl_onpolicy.hinted.decoding import HintedResult
from trl_onpolicy.trainer.online import HINTED_KEY, HintedDataCollator
from trl_onpolicy.data.prompts import render_prompt_ids as prompt_ids
from trl_onpolicy.hinted.realign import RealignConfig, accept_response, realign_dataset, resolve_checker

GSM = "Natalia sold 48/2 = 24 clips in May.\nAltogether she sold 48 + 24 = 72 clips.\n#### 72"
MATH = "First $3x + 5 = 20$, so $3x = 15$; trying $x = \\boxed{3}$ fails, and $x = \\boxed{5}$ works."

# (answer column, reference solution, response text, finished with EOS, accepted)
ROWS = [
    ("72", GSM, "She sold 24 in May, so 48 + 24 = 72.\n#### 72", True, True),
    ("72", GSM, "She sold 24 in May, so 48 + 24 = 72.\n#### 72", False, False),  # no EOS
    ("72", GSM, "She sold 48 + 48 = 96.\n#### 96", True, False),  # wrong answer
    ("72", GSM, "I am not sure how to solve this.", True, False),  # no answer
    (None, GSM, "So 48 + 24 = 72 in all. #### 72", True, True),  # no answer column: the reference's #### line
    (None, GSM, "She sold 48/2 = 24 clips in May.\n#### 24", True, False),  # 24 is in the solution, not its answer
    (None, MATH, "So $x = \\boxed{5}$.", True, True),  # no answer column: the reference's LAST box
    (None, MATH, "The equation 3x + 5 = 20 gives $x = \\boxed{3}$.", True, False),  # an earlier box is not the answer
    ("(2, 3)", MATH, "The point is \\boxed{2}.", True, False),  # the answer column wins over the reference
]


def _rows():
    return [{"prompt": [{"role": "system", "content": "Solve it."}, {"role": "user", "content": f"Problem {i}?"}],
             "question": f"Problem {i}?", "solution": ref, "answer": answer}
            for i, (answer, ref, _, _, _) in enumerate(ROWS)]


def _fake_results(tok, indices):
    out = []
    for i in indices:
        _, _, text, finished, _ = ROWS[i]
        ids = tok(text, add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if finished else [])
        out.append(HintedResult(token_ids=ids, finish_reason="eos" if finished else "length", lambda_mean=0.5))
    return out


def test_accept_response_rule():
    checker = resolve_checker("math_verify")
    for answer, ref, text, finished, accepted in ROWS:
        verdict = accept_response(text, "eos" if finished else "length", answer, ref, checker)
        assert verdict.accepted is accepted, (answer, text)
        assert verdict.reason == (None if accepted else "unfinished" if not finished else "incorrect")
    # the checks can be switched off one by one, and "none" skips grading
    assert accept_response("#### 1", "length", "2", GSM, checker, require_eos=False).reason == "incorrect"
    assert accept_response("#### 1", "eos", "2", GSM, checker, require_correct=False).accepted
    assert accept_response("#### 1", "eos", "2", GSM, None) == realign_module.Acceptance(True, None, None)


def test_offline_and_online_accept_the_same_rows(tiny_model, tmp_path, monkeypatch):
    model, tok = tiny_model
    expected = [row[-1] for row in ROWS]

    # offline: realign's filters (no phi filter), the answer column null where the row has none
    def fake_decode(model, tokenizer, hinted, plain, seed, **kw):
        return _fake_results(tokenizer, [s - 100 for s in seed])

    monkeypatch.setattr(realign_module, "_decode", fake_decode)
    config = RealignConfig(output_dir=str(tmp_path / "out"), seed=100, batch_size=4, shard_size=16,
                           score_reference=False, max_new_tokens=8)
    realign_dataset(model, tok, Dataset.from_list(_rows()), config, progress=False)
    records = [json.loads(line) for line in (Path(tmp_path / "out") / "shards" / "shard-00000.jsonl").read_text().splitlines()]
    assert [r["keep"] for r in sorted(records, key=lambda r: r["index"])] == expected
    # the stored answer is the gold's final answer, never the whole solution
    assert [r["answer"] for r in records] == ["72"] * 4 + ["72", "72", "5", "5", "(2, 3)"]

    # online: the collator's re-alignment of one window holding the same rows
    calls = []

    def fake_hinted_decode(model, tokenizer, hinted, plain, **kw):
        calls.append(len(plain))
        return _fake_results(tokenizer, range(len(plain)))

    monkeypatch.setattr(hinted_module, "hinted_decode", fake_hinted_decode)
    collator = HintedDataCollator(tok, checker="math_verify", on_reject="reference", compute_phi=False,
                                  completion_only_loss=True)
    collator.attach("test")  # as IDFTTrainer does: it re-aligns the batches this collator builds
    examples = [dict(row, input_ids=prompt_ids(tok, row["prompt"]) + [tok.eos_token_id]) for row in _rows()]
    batch = collator(examples)
    assert batch[HINTED_KEY].answers == [row[0] for row in ROWS]
    _, stats = collator.realign(model, [batch])
    assert calls == [len(ROWS)]
    assert stats["accepted"] == sum(expected)
    # which rows: a rejected row trains on its reference (here: prompt + EOS), an accepted one on the response
    new, _ = collator.realign(model, [collator(examples)])
    trained_on_response = [
        int(new[0]["attention_mask"][k].sum()) != len(examples[k]["input_ids"]) for k in range(len(ROWS))
    ]
    assert trained_on_response == expected
