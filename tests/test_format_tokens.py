"""scripts/format_tokens.py: the token classes of a reference answer (real SmolLM2 tokenization of a real `#### N`
line) and the per-unit format shares read back from committed evaluation files."""

import json

import pytest
from conftest import import_script


@pytest.fixture(scope="module")
def format_tokens():
    yield from import_script("format_tokens")


def test_classes_of_a_real_answer_line(format_tokens, smollm2_tokenizer):
    tok = smollm2_tokenizer
    end = tok.convert_tokens_to_ids("<|im_end|>")
    text = "3 + 4 = 7\n7 - 12 = -5\n#### -5"
    ids = tok(text, add_special_tokens=False)["input_ids"] + [end]
    classes = format_tokens.classify(ids, tok, {end}, "####")
    by_class = {c: "".join(tok.decode([i]) for i, k in zip(ids, classes) if k == c) for c in set(classes)}
    assert by_class["marker"].strip() == "####"
    assert by_class["answer"].strip() == "-5"
    assert classes[-1] == "end" and classes.count("end") == 1
    # the working, including the earlier "-5" that is not after the marker, is "rest"
    assert by_class["rest"] == "3 + 4 = 7\n7 - 12 = -5\n"


def test_no_marker_means_no_marker_or_answer_tokens(format_tokens, smollm2_tokenizer):
    tok = smollm2_tokenizer
    ids = tok("The answer is 12.", add_special_tokens=False)["input_ids"]
    assert set(format_tokens.classify(ids, tok, set(), "####")) == {"rest"}


def test_unit_shares_pool_sets_and_seeds(format_tokens, tmp_path):
    """Two seeds of one rate: shares are per-sample over the in-domain sets and averaged over seeds; a unit without
    a result (seed 2) is left out."""
    from trl_onpolicy.compare.config import load_config_file
    from trl_onpolicy.compare.runner import Comparison

    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "model_name_or_path: tiny\noutput_dir: " + str(tmp_path / "out") + "\n"
        "methods:\n  - {name: sft, learning_rates: [1.0e-5], seeds: [0, 1, 2]}\n"
        "data: {task: chain_sum, n: 8}\nbudget: {max_steps: 1}\n"
        "eval:\n  sets:\n    - {name: a, role: in_domain, task: chain_sum, n: 2}\n"
        "    - {name: f, role: retention, task: facts}\n"
    )
    comparison = Comparison(load_config_file(recipe), progress=False)
    units = comparison.units()
    samples = {0: [("#### 3", True), ("no marker", False)], 1: [("#### 3", True), ("#### 4", True)]}
    for unit in units:
        if unit.seed not in samples:
            continue
        folder = comparison.unit_dir(unit)
        (folder / "eval").mkdir(parents=True)
        records = [{"score": float(i == 0), "samples": [{"response": r, "finished": f}]}
                   for i, (r, f) in enumerate(samples[unit.seed])]
        (folder / "eval" / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    comparison.finished = lambda unit: {"status": "ok"} if unit.seed in samples else None  # seed 2 never finished
    (row,) = format_tokens.unit_format_shares(comparison)
    assert row["seeds"] == 2
    assert row["marker"] == {"mean": 0.75, "min": 0.5, "max": 1.0}
    assert row["cut_off"] == {"mean": 0.25, "min": 0.0, "max": 0.5}
    assert row["accuracy"]["mean"] == 0.5


@pytest.mark.parametrize("item", ["idft", "idft@", "idft@nan", "idft@inf", "idft@-1e-5", "idft@0"])
def test_retrain_refuses_a_bad_rate_before_any_work(format_tokens, item):
    with pytest.raises(SystemExit, match="--retrain"):
        format_tokens.main(["--config", "no/such/recipe.yaml", "--retrain", item])


def test_seed_and_label_are_checked_before_any_model_runs(format_tokens, tmp_path):
    with pytest.raises(SystemExit, match="--seed -1"):
        format_tokens.main(["--config", "no/such/recipe.yaml", "--seed", "-1"])
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model_name_or_path: tiny\noutput_dir: " + str(tmp_path / "out") + "\n"
                      "methods:\n  - {name: sft, learning_rates: [1.0e-5]}\ndata: {task: chain_sum, n: 8}\n"
                      "budget: {max_steps: 1}\neval:\n  sets:\n    - {name: a, role: in_domain, task: chain_sum, n: 2}\n")
    with pytest.raises(SystemExit, match="no method labelled 'idft'"):
        format_tokens.main(["--config", str(recipe), "--retrain", "idft@1e-5"])
