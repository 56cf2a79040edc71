"""`compare` under conditions a long study meets: several processes writing one report, a report write that fails,
units stored under an older configuration or other library versions, mixed-precision training, and an evaluation
backend that cannot see the trained weights."""

import json
import multiprocessing
import shutil
from types import SimpleNamespace

import pytest
import torch
import yaml

import trl_onpolicy
import trl_onpolicy.compare as compare
from trl_onpolicy.compare import Comparison, load_config_file, parse_config
from trl_onpolicy.compare import report as compare_report
from trl_onpolicy.compare import runner as compare_runner

SETS = [{"name": "in_domain", "task": "chain_sum", "n": 3, "seed": 1,
         "task_kwargs": {"min_terms": 2, "max_terms": 2, "max_digits": 1}}]
NO_METRICS = {"kl": False, "nll": False}


def _recipe(tmp_path, model_dir, methods, **extra):
    raw = {
        "model_name_or_path": str(model_dir), "output_dir": str(tmp_path / "out"), "num_threads": 1, "methods": methods,
        "data": {"task": "chain_sum", "n": 4, "task_kwargs": {"min_terms": 2, "max_terms": 2, "max_digits": 1}},
        "budget": {"max_steps": 2, "per_device_train_batch_size": 2, "max_length": 96},
        "eval": {"max_new_tokens": 4, "batch_size": 8, "sets": SETS}, "metrics": NO_METRICS,
        "phi": {"enabled": False}, **extra,
    }
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


# ---- several processes writing the report of one output folder ------------------------------------------------------

REPORT_SETS = [SimpleNamespace(name="in_domain", role="in_domain")]
FINAL_LINE = "Peak RSS: the whole process, sampled."


def _fake_results(k: int) -> dict:
    out = {}
    for seed in range(k):
        key = f"sft/lr=1e-3/seed={seed}"
        out[key] = {"key": key, "label": "sft", "method": "sft", "learning_rate": 1e-3, "seed": seed, "status": "ok",
                    "eval": {"in_domain": {"accuracy": 0.5, "ci_low": 0.2, "ci_high": 0.8, "num_prompts": 3}}}
    return out


def _write_reports(out, n: int, offset: int) -> None:
    cfg = SimpleNamespace(eval_sets=REPORT_SETS, contrasts=(), title=None,
                          budget=SimpleNamespace(max_steps=1, per_device_train_batch_size=1, gradient_accumulation_steps=1))
    for i in range(n):
        compare_report.write_report(_fake_results(1 + (i + offset) % 5), cfg, out, {}, plots=False)


def test_three_processes_write_one_report_without_failing(tmp_path):
    """Issue 18 #6: three `--shard auto` workers used to share one temporary file name; 14 of 900 writes failed and
    killed a worker. Three real processes now write 3 x 150 reports at once: none fails, and a reader only ever sees
    a complete report."""
    out = tmp_path / "out"
    out.mkdir()
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_write_reports, args=(out, 150, i)) for i in range(3)]
    for p in procs:
        p.start()
    reads = 0
    while any(p.is_alive() for p in procs):
        path = out / "results.md"
        if not path.is_file():
            continue
        text = path.read_text()
        k = int(text.split("Units finished: ")[1].split(" of ")[0])
        assert f"Units finished: {k} of {k}." in text and text.rstrip().endswith(FINAL_LINE), text[-300:]
        assert sum(line.startswith("| sft/lr=1e-3/seed=") for line in text.splitlines()) == k
        assert 1 <= len(json.loads((out / "results.json").read_text())["units"]) <= 5
        reads += 1
    for p in procs:
        p.join()
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert reads >= 3  # the reader really ran while the writers wrote
    assert sorted(f.name for f in out.iterdir()) == ["results.json", "results.md"]  # no temporary file left behind


def test_an_interim_report_that_fails_does_not_stop_the_sweep(tmp_path, tiny_model_dir, monkeypatch, capsys):
    original = compare_runner.write_report
    calls = {"interim": 0}

    def flaky(results, cfg, out, config, plots=True):
        if not plots:
            calls["interim"] += 1
            raise FileNotFoundError(2, "No such file or directory", str(out / ".results.md.tmp"))
        return original(results, cfg, out, config, plots=plots)

    monkeypatch.setattr(compare_runner, "write_report", flaky)
    path = _recipe(tmp_path, tiny_model_dir, ["base", "sft"], sweep={"learning_rates": [1e-3, 1e-2]})
    assert compare.main(["--config", str(path)]) == 0
    assert calls["interim"] == 3  # one interim report per unit, each failed
    units = json.loads((tmp_path / "out" / "results.json").read_text())["units"]
    assert set(units) == {"base", "sft/lr=1e-3/seed=0", "sft/lr=1e-2/seed=0"}
    assert all(u["status"] == "ok" for u in units.values())
    assert capsys.readouterr().err.count("warning: the interim report could not be written") == 3

    # the final report's failure is an error (not "bad input"): the units are kept, the command says what failed
    monkeypatch.setattr(compare_runner, "write_report", lambda *a, **k: (_ for _ in ()).throw(PermissionError("denied")))
    with pytest.raises(RuntimeError, match="writing the final report into .* failed: denied"):
        compare.main(["--config", str(path)])


# ---- stale units and library versions --------------------------------------------------------------------------------


def test_report_only_keeps_units_of_a_changed_model_marked(tmp_path, tiny_model_dir, capsys):
    from transformers import AutoModelForCausalLM

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    path = _recipe(tmp_path, model_dir, ["base", "sft"])
    assert compare.main(["--config", str(path)]) == 0
    out = tmp_path / "out"
    stored = json.loads((out / "methods" / "sft" / "lr1e-5_seed0" / "result.json").read_text())
    import transformers
    import trl

    assert stored["versions"] == {"torch": torch.__version__, "transformers": transformers.__version__,
                                  "trl": trl.__version__, "trl_onpolicy": trl_onpolicy.__version__}

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        next(model.parameters()).add_(0.01)
    model.save_pretrained(model_dir)
    capsys.readouterr()
    assert compare.main(["--config", str(path), "--report_only", "true"]) == 1  # nothing of this configuration yet
    md = (out / "results.md").read_text()
    assert "**2 of 2 units were produced under a different configuration than this recipe's** (model changed: 2)" in md
    assert "| base | ok (model changed) |" in md and "| sft/lr=1e-5/seed=0 | ok (model changed) |" in md
    assert "| sft | 1e-5 | 1/1 (1 stale) |" in md
    units = json.loads((out / "results.json").read_text())["units"]
    assert {k: u["stale"] for k, u in units.items()} == {"base": ["model"], "sft/lr=1e-5/seed=0": ["model"]}
    assert "2 unit(s) have not finished under this configuration" in capsys.readouterr().err

    # a configuration with no stored unit at all never replaces the published report with an empty one
    before = {name: (out / name).read_bytes() for name in ("results.md", "results.json")}
    assert compare.main(["--config", str(path), "--report_only", "true", "--methods", "dft"]) == 1
    assert {name: (out / name).read_bytes() for name in before} == before
    assert "the existing report is kept" in capsys.readouterr().err

    # a real run recomputes them; the marks go away
    assert compare.main(["--config", str(path)]) == 0
    md = (out / "results.md").read_text()
    assert "different configuration" not in md and "| base | ok |" in md


def _unit(key, versions):
    return {"key": key, "label": key.split("/")[0], "method": "sft", "learning_rate": 1e-3, "seed": int(key[-1]),
            "status": "ok", "versions": versions,
            "eval": {"in_domain": {"accuracy": 0.5, "ci_low": 0.2, "ci_high": 0.8, "num_prompts": 3}}}


def test_report_lists_library_versions_and_where_units_differ():
    new = {"torch": "2.13.0", "transformers": "5.23.0"}
    old = {"torch": "2.11.0", "transformers": "5.23.0"}
    results = {"sft/lr=1e-3/seed=0": _unit("sft/lr=1e-3/seed=0", new), "sft/lr=1e-3/seed=1": _unit("sft/lr=1e-3/seed=1", old),
               "sft/lr=1e-3/seed=2": _unit("sft/lr=1e-3/seed=2", None)}  # committed before versions were recorded
    agg = compare_report.aggregate(results, REPORT_SETS)
    md = compare_report.results_markdown(agg, REPORT_SETS)
    assert "**Library versions differ across units**" in md
    assert "1 unit(s) record no versions (written by an older compare): unknown, not a difference." in md
    assert "| torch | 2.13.0 | 1: `sft/lr=1e-3/seed=0` |" in md and "| torch | 2.11.0 | 1: `sft/lr=1e-3/seed=1` |" in md
    assert "Shared: transformers 5.23.0." in md and "| transformers |" not in md
    # the same versions everywhere (and a unit without any): one line, no difference reported
    results["sft/lr=1e-3/seed=1"]["versions"] = new
    md = compare_report.results_markdown(compare_report.aggregate(results, REPORT_SETS), REPORT_SETS)
    assert "Library versions (every unit that records them): torch 2.13.0, transformers 5.23.0." in md
    assert "Library versions differ" not in md


# ---- precision ---------------------------------------------------------------------------------------------------------


def _changed_fraction(dtype: str, tmp_path, model_dir) -> tuple[float, torch.dtype]:
    path = _recipe(tmp_path / dtype, model_dir, ["sft"], dtype=dtype, sweep={"learning_rates": [1e-5]},
                   budget={"max_steps": 3, "per_device_train_batch_size": 2, "max_length": 96})
    comparison = Comparison(load_config_file(path))
    comparison.validate()
    model, tokenizer = comparison.load_base()
    start = {k: v.detach().float().clone() for k, v in model.named_parameters()}
    _, trained = comparison.train(comparison.units()[0], model, tokenizer)
    params = dict(trained.named_parameters())
    changed = sum(int((params[k].detach().float() != v).sum()) for k, v in start.items())
    return changed / sum(v.numel() for v in start.values()), next(trained.parameters()).dtype


def test_bf16_recipe_trains_float32_master_weights(tmp_path, tiny_model_dir):
    """Issue 18 #1: the GPU preset's dtype (bfloat16) used to train the bf16 weights themselves, where an Adam step of
    1e-5 rounds away for most weights. With float32 master weights and bf16 autocast it moves as many weights as a
    float32 run does."""
    (tmp_path / "float32").mkdir()
    (tmp_path / "bfloat16").mkdir()
    fp32, _ = _changed_fraction("float32", tmp_path, tiny_model_dir)
    bf16, dtype = _changed_fraction("bfloat16", tmp_path, tiny_model_dir)
    assert fp32 > 0.5  # (embedding rows of tokens absent from the batches get no gradient)
    assert dtype == torch.float32 and bf16 >= 0.95 * fp32, (bf16, fp32)
    cfg = load_config_file(tmp_path / "bfloat16" / "compare.yaml")
    args = Comparison(cfg).precision_args()
    assert args["bf16"] is True and args["fp16"] is False


@pytest.mark.skipif(torch.cuda.is_available(), reason="float16 autocast is refused only without a GPU")
def test_float16_is_refused_without_a_gpu(tmp_path, tiny_model_dir):
    comparison = Comparison(load_config_file(_recipe(tmp_path, tiny_model_dir, ["sft"], dtype="float16")))
    with pytest.raises(ValueError, match="dtype='float16' is invalid: float16 mixed precision needs a CUDA GPU"):
        comparison.validate()
    assert not (tmp_path / "out").exists()


# ---- evaluation backend --------------------------------------------------------------------------------------------------


def test_vllm_backend_is_refused_at_parsing(tmp_path, tiny_model_dir):
    """Issue 18 #2: vLLM loads weights from model.name_or_path (the base folder), so every unit would be scored as the
    base model. compare refuses it before any work."""
    raw = yaml.safe_load(_recipe(tmp_path, tiny_model_dir, ["base", "sft"]).read_text())
    raw["eval"]["backend"] = "vllm"
    with pytest.raises(ValueError, match=r"eval.backend='vllm' is invalid: expected 'hf': .*base model"):
        parse_config(raw)
    raw["eval"]["backend"] = "hf"
    assert parse_config(raw).eval_config.backend == "hf"


def test_registry_covers_every_method():
    assert compare.METHODS == ("base", "sft", "dft", "eaft", "idft", "sft_hinted", "idft_hinted", "idft_online",
                               "sft_online", "sdft", "dpo", "simpo")
    assert not compare.REGISTRY["base"].trains
    assert all(compare.REGISTRY[m].trains and compare.REGISTRY[m].config for m in compare.METHODS if m != "base")


def test_preference_pairs_cache_is_built_once_and_replaced_whole(tmp_path, tiny_model_dir, capsys):
    """dpo and simpo share corpora/pairs: built once into a temporary folder and renamed into place (no temporary
    folder left), reused by the next unit, and replaced whole when the pair settings change."""
    pairs = {"num_samples": 2, "max_new_tokens": 4}
    path = _recipe(tmp_path, tiny_model_dir, [{"name": "dpo", "args": {"beta": 0.1}}, "simpo"], pairs=pairs,
                   budget={"max_steps": 1, "per_device_train_batch_size": 2, "max_length": 96})
    assert compare.main(["--config", str(path)]) == 0
    corpora = tmp_path / "out" / "corpora"
    assert sorted(p.name for p in corpora.iterdir() if not p.name.endswith(".lock")) == ["pairs"]
    stats = json.loads((corpora / "pairs" / "pairs_stats.json").read_text())
    units = json.loads((tmp_path / "out" / "results.json").read_text())["units"]
    assert all(u["status"] == "ok" for u in units.values()), units
    assert units["dpo/lr=1e-5/seed=0"]["num_train_samples"] == stats["num_pairs"] > 0
    first = json.loads((corpora / "pairs" / "fingerprint.json").read_text())
    capsys.readouterr()
    path = _recipe(tmp_path, tiny_model_dir, [{"name": "dpo", "args": {"beta": 0.1}}], pairs={**pairs, "num_samples": 3},
                   budget={"max_steps": 1, "per_device_train_batch_size": 2, "max_length": 96})
    assert compare.main(["--config", str(path)]) == 0
    assert "corpora/pairs was built from a different settings; rebuilding it" in capsys.readouterr().out
    assert json.loads((corpora / "pairs" / "fingerprint.json").read_text()) != first
    assert sorted(p.name for p in corpora.iterdir() if not p.name.endswith(".lock")) == ["pairs"]
