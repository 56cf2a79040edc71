"""Evaluation: intervals, batched generation, set loading, scoring and the `trl-onpolicy eval` command."""

import json
import math

import pytest
import torch

from trl_onpolicy.cli import eval as eval_cli
from trl_onpolicy.eval import evaluation
from trl_onpolicy.eval.evaluation import (
    EvalConfig,
    EvalSet,
    Generation,
    accuracy_with_ci,
    evaluate,
    generate_responses,
    load_eval_set,
    mean_interval,
    wilson_interval,
)


def _wilson_by_inversion(x, n, z=1.959963984540054):
    """The Wilson interval is {p : |x/n - p| <= z sqrt(p(1-p)/n)}: find its ends by bisection (independent of the
    closed form)."""
    phat = x / n
    inside = lambda p: abs(phat - p) <= z * math.sqrt(p * (1 - p) / n) + 1e-15  # noqa: E731

    def edge(lo, hi):  # lo outside, hi inside (or the reverse); bisect the boundary
        for _ in range(200):
            mid = (lo + hi) / 2
            if inside(mid) == inside(hi):
                hi = mid
            else:
                lo = mid
        return (lo + hi) / 2

    low = 0.0 if inside(0.0) else edge(0.0, phat)
    high = 1.0 if inside(1.0) else edge(1.0, phat)
    return low, high


@pytest.mark.parametrize("x, n", [(0, 10), (3, 10), (10, 10), (17, 50), (1, 1), (250, 1000)])
def test_wilson_matches_inversion(x, n):
    low, high = wilson_interval(x, n)
    ref_low, ref_high = _wilson_by_inversion(x, n)
    assert low == pytest.approx(ref_low, abs=1e-9)
    assert high == pytest.approx(ref_high, abs=1e-9)
    assert low <= x / n <= high


def test_avg_at_k_interval_uses_prompts_as_units():
    per_prompt = [[True, True, False, False], [True, True, True, True], [False] * 4, [True, False, False, False]]
    m = accuracy_with_ci(per_prompt)
    scores = [0.5, 1.0, 0.0, 0.25]
    mean = sum(scores) / 4
    sd = math.sqrt(sum((s - mean) ** 2 for s in scores) / 3)
    assert m["accuracy"] == pytest.approx(mean)
    assert m["ci_low"] == pytest.approx(max(0.0, mean - 1.959963984540054 * sd / 2))
    assert m["ci_high"] == pytest.approx(min(1.0, mean + 1.959963984540054 * sd / 2))
    assert m["k"] == 4 and m["num_prompts"] == 4 and "normal" in m["ci_method"]
    # k = 1 is a plain proportion with the Wilson interval
    m1 = accuracy_with_ci([[True], [False], [True]])
    assert (m1["ci_low"], m1["ci_high"]) == wilson_interval(2, 3) and m1["ci_method"] == "wilson"
    assert mean_interval([]) == (0.0, 0.0)


def _manual_greedy(model, tok, prompt, max_new_tokens):
    """Decode one prompt alone, without padding or cache, one argmax token at a time."""
    text = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    out = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(input_ids=torch.tensor([ids + out]), use_cache=False).logits[0, -1]
            nxt = int(logits.argmax())
            out.append(nxt)
            if nxt == tok.eos_token_id:
                break
    return out


def test_batched_greedy_equals_single_unpadded_decoding(tiny_model):
    model, tok = tiny_model
    prompts = [[{"role": "user", "content": q}] for q in ["What is 1 + 1?", "Hi", "Compute 12 + 7 - 3 step by step please."]]
    gens = generate_responses(model, tok, prompts, max_new_tokens=12, batch_size=3, progress=False)
    for prompt, (g,) in zip(prompts, gens):
        ref = _manual_greedy(model, tok, prompt, 12)
        assert g.num_tokens == len(ref)
        assert g.text == tok.decode(ref, skip_special_tokens=True)
        assert g.finished == (ref[-1] == tok.eos_token_id)


def test_sampling_is_seeded_and_shaped(tiny_model):
    model, tok = tiny_model
    prompts = ["What is 2 + 2?", "Name a colour."]
    kw = dict(num_samples=3, temperature=1.0, max_new_tokens=6, batch_size=4, progress=False)
    a = generate_responses(model, tok, prompts, seed=1, **kw)
    b = generate_responses(model, tok, prompts, seed=1, **kw)
    assert [len(s) for s in a] == [3, 3]
    assert [[g.text for g in s] for s in a] == [[g.text for g in s] for s in b]
    # greedy with k samples decodes once and repeats
    g = generate_responses(model, tok, prompts, num_samples=2, temperature=0.0, max_new_tokens=4, progress=False)
    assert g[0][0] == g[0][1]
    with pytest.raises(ValueError, match="num_samples"):
        generate_responses(model, tok, prompts, num_samples=0)
    with pytest.raises(ValueError, match="backend"):
        generate_responses(model, tok, prompts, backend="tgi")


def test_eval_set_specs_and_loading(tmp_path):
    s = EvalSet.from_spec("in=chain_sum:5:3")
    assert (s.name, s.task, s.n, s.seed, s.checker) == ("in", "chain_sum", 5, 3, "math_verify")
    f = EvalSet.from_spec("facts=facts:4")
    assert f.role == "retention" and f.checker == "contains"
    assert len(load_eval_set(f)) == 4
    rows = load_eval_set(EvalSet(name="cs", task="chain_sum", n=5, seed=3))
    assert len(rows) == 5 and all(r["prompt"][-1]["role"] == "user" and r["answer"] for r in rows)
    assert rows == load_eval_set(EvalSet(name="cs", task="chain_sum", n=5, seed=3))  # deterministic
    path = tmp_path / "set.jsonl"
    path.write_text("\n".join(json.dumps({"question": f"q{i}", "answer": str(i)}) for i in range(3)))
    frows = load_eval_set(EvalSet.from_spec(f"file={path}"))
    assert [r["answer"] for r in frows] == ["0", "1", "2"] and frows[1]["prompt"][0]["content"] == "q1"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"q": "x"}))
    with pytest.raises(ValueError, match="answer"):
        load_eval_set(EvalSet(name="b", path=str(bad)))
    with pytest.raises(ValueError, match="unknown key"):
        EvalSet.from_spec({"name": "x", "tasks": "chain_sum"})
    with pytest.raises(ValueError, match="role"):
        EvalSet(name="x", task="facts", role="general")
    with pytest.raises(ValueError, match="name=task"):
        EvalSet.from_spec("chain_sum")
    with pytest.raises(ValueError, match="temperature"):
        EvalConfig(num_samples=4, temperature=0.0)
    # the shared sampler fields (generation.SamplingConfig) are checked for evaluation and for preference pairs
    from trl_onpolicy.eval.preferences import PairConfig

    for cls in (EvalConfig, PairConfig):
        for bad, field_name in [(dict(top_p=0.0), "top_p"), (dict(batch_size=0), "batch_size"),
                                (dict(max_new_tokens=0), "max_new_tokens"), (dict(num_samples=0), "num_samples"),
                                (dict(temperature=-0.5), "temperature")]:
            with pytest.raises(ValueError, match=field_name):
                cls(**bad)


def test_evaluate_counts_exactly_with_controlled_generations(tiny_model, tmp_path, monkeypatch):
    model, tok = tiny_model
    path = tmp_path / "set.jsonl"
    golds = ["3", "-5", "1234", "0.5", "7"]
    path.write_text("\n".join(json.dumps({"question": f"q{i}", "answer": a}) for i, a in enumerate(golds)))
    # responses per prompt (k = 2): correct-correct, correct-wrong, correct(1,234)-none, \frac12-wrong, wrong-wrong
    canned = [
        ["#### 3", "\\boxed{3}"],
        ["it is -5", "it is 5"],
        ["1,234 apples", "no idea"],
        ["\\boxed{\\frac{1}{2}}", "0.25"],
        ["8", "6"],
    ]

    def fake_generate(model, tokenizer, prompts, *, num_samples, **kwargs):
        assert num_samples == 2 and len(prompts) == len(canned)
        return [[Generation(t, 3, True) for t in canned[int(p[0]["content"][1:])]] for p in prompts]

    monkeypatch.setattr(evaluation, "generate_responses", fake_generate)
    config = EvalConfig(num_samples=2, temperature=1.0, check_workers=2, progress=False)
    out = evaluate(model, tok, [EvalSet(name="s", path=str(path))], config, tmp_path / "ev")
    per_prompt = [[1, 1], [1, 0], [1, 0], [1, 0], [0, 0]]
    expected = sum(sum(p) / 2 for p in per_prompt) / 5
    assert out["s"]["accuracy"] == pytest.approx(expected)
    assert out["s"]["answer_found"] == pytest.approx(9 / 10)
    lines = [json.loads(x) for x in (tmp_path / "ev" / "s.jsonl").read_text().splitlines()]
    assert [[s["correct"] for s in r["samples"]] for r in lines] == [[bool(x) for x in p] for p in per_prompt]
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["s"]["accuracy"] == pytest.approx(expected)


def test_eval_cli_on_tiny_model(tiny_model_dir, tmp_path, capsys):
    path = tmp_path / "set.jsonl"
    path.write_text("\n".join(json.dumps({"question": f"What is {i} + 1?", "answer": str(i + 1)}) for i in range(3)))
    out = tmp_path / "out"
    rc = eval_cli.main(
        ["--model_name_or_path", str(tiny_model_dir), "--sets", f"mine={path}", "facts=facts:2",
         "--max_new_tokens", "4", "--output_dir", str(out), "--num_threads", "1"]
    )
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"mine", "facts"} and metrics["mine"]["num_prompts"] == 3
    assert len((out / "mine.jsonl").read_text().splitlines()) == 3
    assert "mine" in capsys.readouterr().out
    # fingerprint.json records what produced the outputs: the weights' files, each set's rows, the settings
    from trl_onpolicy.utils.fingerprint import data_fingerprint, model_fingerprint

    recorded = json.loads((out / "fingerprint.json").read_text())
    assert recorded["model"] == model_fingerprint(str(tiny_model_dir))
    assert recorded["sets"]["mine"]["data"] == data_fingerprint(evaluation.load_eval_set(evaluation.EvalSet.from_spec(f"mine={path}")))
    path.write_text(path.read_text().replace('"answer": "2"', '"answer": "3"'))
    assert eval_cli.main(["--model_name_or_path", str(tiny_model_dir), "--sets", f"mine={path}", "facts=facts:2",
                            "--max_new_tokens", "4", "--output_dir", str(out), "--temperature", "0.5"]) == 0
    again = json.loads((out / "fingerprint.json").read_text())
    assert again["model"] == recorded["model"] and again["sets"]["facts"] == recorded["sets"]["facts"]
    assert again["sets"]["mine"]["data"] != recorded["sets"]["mine"]["data"] and again["settings"] != recorded["settings"]


def test_eval_command_runs_cli_eval_with_the_same_flags():
    import dataclasses

    from trl_onpolicy.cli.commands import COMMANDS

    assert COMMANDS["eval"][0] == "trl_onpolicy.cli.eval"
    flags = [(f.name, f.default if f.default is not dataclasses.MISSING else f.default_factory())
             for f in dataclasses.fields(eval_cli.EvalArguments)]
    assert flags == [  # the flags of `trl-onpolicy eval` before its CLI moved out of trl_onpolicy.eval.evaluation
        ("num_samples", 1), ("temperature", 0.0), ("top_p", 1.0), ("max_new_tokens", 256), ("batch_size", 8),
        ("seed", 0), ("backend", "hf"), ("check_workers", 1), ("progress", True),
        ("model_name_or_path", "embedded:smollm2-135m-instruct"), ("sets", ["in_domain=chain_sum:50", "facts=facts"]),
        ("output_dir", "runs/eval"), ("dtype", "float32"), ("num_threads", None),
    ]


def test_encode_prompts_turns_plain_questions_into_a_user_turn_only_with_a_chat_template(tiny_tokenizer):
    import copy

    tok = tiny_tokenizer
    question, system = "What is 2 + 3?", {"role": "system", "content": "Be brief."}
    turn = [{"role": "user", "content": question}]
    # independent reference: the chat template rendered to text, then tokenized without special tokens
    want = [tok(tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
            for m in (turn, turn, [system] + turn)]
    assert evaluation.encode_prompts(tok, [question, turn, [system] + turn]) == want
    plain = copy.copy(tok)
    plain.chat_template = None
    assert evaluation.encode_prompts(plain, [question]) == [tok(question)["input_ids"]]
    with pytest.raises(ValueError, match="no chat template"):
        evaluation.encode_prompts(plain, [turn])
