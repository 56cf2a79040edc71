"""`trl-onpolicy compare` end to end on a tiny model: two methods, resume, crash isolation, missing modules."""

import json
import sys

import pytest

import trl_onpolicy
import yaml

from trl_onpolicy import compare
from trl_onpolicy.compare import Comparison, load_config_file, parse_config

SETS = [
    {"name": "in_domain", "task": "chain_sum", "n": 4, "seed": 1, "task_kwargs": {"min_terms": 2, "max_terms": 2, "max_digits": 1}},
    {"name": "facts", "task": "facts", "n": 3, "role": "retention"},
]


def _recipe(tmp_path, model_dir, methods, **extra):
    raw = {
        "model_name_or_path": str(model_dir),
        "output_dir": str(tmp_path / "out"),
        "num_threads": 1,
        "methods": methods,
        "data": {"task": "chain_sum", "n": 4, "task_kwargs": {"min_terms": 2, "max_terms": 2, "max_digits": 1}},
        "budget": {"max_steps": 2, "per_device_train_batch_size": 2, "max_length": 96},
        "eval": {"max_new_tokens": 6, "batch_size": 8, "sets": SETS},
        "phi": {"max_samples": 4},
        **extra,
    }
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture
def run_calls(monkeypatch):
    """Count how often each method really runs (resume must skip finished ones)."""
    calls = []
    original = Comparison.run_method

    def counting(self, spec):
        calls.append(spec.label)
        return original(self, spec)

    monkeypatch.setattr(Comparison, "run_method", counting)
    return calls


def test_two_methods_end_to_end_then_resume(tmp_path, tiny_model_dir, run_calls, capsys):
    path = _recipe(tmp_path, tiny_model_dir, ["base", "sft"])
    assert compare.main(["--config", str(path)]) == 0
    out = tmp_path / "out"
    results = json.loads((out / "results.json").read_text())["methods"]
    assert run_calls == ["base", "sft"]
    assert results["base"]["status"] == "ok" and results["sft"]["status"] == "ok", results
    sft = json.loads((out / "methods" / "sft" / "result.json").read_text())
    assert sft["steps"] == 2 and sft["num_train_samples"] == 4
    # tokens trained: our count of non-padding tokens equals TRL's own cumulative `num_tokens` log
    trl_tokens = [h["num_tokens"] for h in sft["log_history"] if "num_tokens" in h][-1]
    assert sft["tokens_trained"] == trl_tokens > 0
    for name in ("in_domain", "facts"):
        m = results["sft"]["sets"][name]
        assert m["ci_low"] <= m["accuracy"] <= m["ci_high"]
        assert len((out / "methods" / "sft" / "eval" / f"{name}.jsonl").read_text().splitlines()) == m["num_prompts"]
    assert results["base"]["change_vs_base"] == {"in_domain": 0.0, "facts": 0.0}
    assert results["sft"]["retention_change"] == pytest.approx(
        results["sft"]["sets"]["facts"]["accuracy"] - results["base"]["sets"]["facts"]["accuracy"]
    )
    assert isinstance(results["sft"]["train_phi"], float)
    assert (out / "compare_accuracy.png").stat().st_size > 1000
    md = (out / "results.md").read_text()
    assert "| base | ok |" in md and "| sft | ok |" in md

    # resume with one more method: the finished ones are not run again (counter and file mtime)
    mtimes = {m: (out / "methods" / m / "result.json").stat().st_mtime_ns for m in ("base", "sft")}
    path = _recipe(tmp_path, tiny_model_dir, ["base", "sft", "dft"])
    assert compare.main(["--config", str(path)]) == 0
    assert run_calls == ["base", "sft", "dft"]
    assert {m: (out / "methods" / m / "result.json").stat().st_mtime_ns for m in ("base", "sft")} == mtimes
    results = json.loads((out / "results.json").read_text())["methods"]
    assert list(results) == ["base", "sft", "dft"] and results["dft"]["status"] == "ok"
    assert "already done" in capsys.readouterr().out


def test_resume_after_a_half_finished_run(tmp_path, tiny_model_dir, run_calls, monkeypatch):
    # the first run dies (as if killed) after base finished and while sft is running
    original = Comparison.train

    def die(self, spec, model, tokenizer):
        raise KeyboardInterrupt

    monkeypatch.setattr(Comparison, "train", die)
    path = _recipe(tmp_path, tiny_model_dir, ["base", "sft"])
    with pytest.raises(KeyboardInterrupt):
        compare.main(["--config", str(path)])
    out = tmp_path / "out"
    assert (out / "methods" / "base" / "result.json").is_file()
    assert not (out / "methods" / "sft" / "result.json").exists()
    base_mtime = (out / "methods" / "base" / "result.json").stat().st_mtime_ns

    monkeypatch.setattr(Comparison, "train", original)
    assert compare.main(["--config", str(path)]) == 0
    assert run_calls == ["base", "sft", "sft"]  # base ran once; sft again after the interruption
    assert (out / "methods" / "base" / "result.json").stat().st_mtime_ns == base_mtime
    results = json.loads((out / "results.json").read_text())["methods"]
    assert results["sft"]["status"] == "ok"


def test_failures_are_recorded_and_others_go_on(tmp_path, tiny_model_dir, monkeypatch, run_calls):
    original = Comparison.train

    def flaky(self, spec, model, tokenizer):
        if spec.name == "dft":
            raise RuntimeError("boom in dft")
        return original(self, spec, model, tokenizer)

    monkeypatch.setattr(Comparison, "train", flaky)
    monkeypatch.setitem(sys.modules, "trl_onpolicy.hinted_online", None)  # as if the module were not installed
    # an earlier test in this process may have imported it: `from . import x` reads the package attribute first
    monkeypatch.delattr(trl_onpolicy, "hinted_online", raising=False)
    path = _recipe(tmp_path, tiny_model_dir, ["dft", "idft_online", "sft"])
    assert compare.main(["--config", str(path)]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())["methods"]
    assert results["dft"]["status"] == "failed" and "boom in dft" in results["dft"]["error"]
    assert results["idft_online"]["status"] == "unavailable" and "hinted_online" in results["idft_online"]["error"]
    assert results["sft"]["status"] == "ok"
    md = (tmp_path / "out" / "results.md").read_text()
    assert "boom in dft" in md and "hinted_online" in md
    # a failed method is retried on the next run, a finished one is not
    monkeypatch.setattr(Comparison, "train", original)
    run_calls.clear()
    compare.main(["--config", str(path), "--methods", "dft,sft"])
    assert run_calls == ["dft"]


def test_recipe_errors_name_the_key(tmp_path, tiny_model_dir):
    good = yaml.safe_load(_recipe(tmp_path, tiny_model_dir, ["base"]).read_text())
    with pytest.raises(ValueError, match="max_step"):
        parse_config({**good, "budget": {"max_step": 3}})
    with pytest.raises(ValueError, match="Unknown method 'ppo'"):
        parse_config({**good, "methods": ["base", "ppo"]})
    with pytest.raises(ValueError, match="shared `budget`"):
        parse_config({**good, "methods": [{"name": "sft", "args": {"max_steps": 100}}]})
    with pytest.raises(ValueError, match="unique"):
        parse_config({**good, "methods": ["sft", "sft"]})
    with pytest.raises(ValueError, match="Unknown top-level"):
        parse_config({**good, "modle": "x"})
    with pytest.raises(ValueError, match="eval.sets"):
        parse_config({**good, "eval": {}})
    with pytest.raises(ValueError, match="output_dir"):
        parse_config({k: v for k, v in good.items() if k != "output_dir"})
    cfg = load_config_file(tmp_path / "compare.yaml", {"methods": "base,idft"})
    assert [m.label for m in cfg.method_specs] == ["base", "idft"]


def test_shipped_compare_recipes_parse():
    from pathlib import Path

    recipes = sorted((Path(__file__).parent.parent / "recipes" / "compare").glob("*.yaml"))
    assert recipes
    for path in recipes:
        cfg = load_config_file(path)
        assert cfg.method_specs and cfg.eval_sets


def test_hinted_corpus_falls_back_to_references(tmp_path, tiny_model_dir):
    # a random tiny model never gets the answer right, so the realign filters drop every re-aligned response and the
    # default fallback trains on the reference for each of them: same prompts as the other methods, counted exactly
    path = _recipe(tmp_path, tiny_model_dir, ["sft_hinted"], hinted={"max_new_tokens": 6, "batch_size": 4})
    assert compare.main(["--config", str(path)]) == 0
    result = json.loads((tmp_path / "out" / "methods" / "sft_hinted" / "result.json").read_text())
    assert result["status"] == "ok", result.get("error")
    hinted = result["hinted_summary"]
    assert hinted["num_kept"] == hinted["num_realigned_used"] == 0
    assert hinted["num_reference_used"] == result["num_train_samples"] == 4
    assert result["corpus"] == "hinted_reference"


def test_token_counter_counts_each_sequence_once():
    import torch

    class FakeTrainer:
        def __init__(self):
            self.callbacks = []

        def training_step(self, model, inputs, *args, **kwargs):
            return 0.0

        def add_callback(self, cb):
            self.callbacks.append(cb)

    trainer = FakeTrainer()
    counter = compare._token_counter_callback(trainer, max_tokens=None)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    trainer.training_step(None, {"input_ids": torch.zeros(2, 4), "attention_mask": mask})  # SFT / DPO batch
    assert counter["tokens"] == 5
    trainer.training_step(None, {  # CPO/SimPO batch: chosen/rejected sequences include the prompt
        "prompt_attention_mask": torch.ones(1, 2), "chosen_attention_mask": torch.ones(1, 3),
        "rejected_attention_mask": torch.tensor([[1, 1, 1, 1, 0]])})
    assert counter["tokens"] == 5 + 3 + 4
    trainer.training_step(None, {"input_ids": torch.zeros(1, 6)})  # no mask: every position
    assert counter["tokens"] == 18
