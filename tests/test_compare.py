"""`trl-onpolicy compare` end to end on a tiny model: sweeps (methods x learning rates x seeds), aggregation and
pairing, the frontier plot, resume, staleness, failures and validation before any training."""

import json
import math
import statistics
import sys

import pytest
import torch
import yaml

import trl_onpolicy
from trl_onpolicy.utils.io import file_lock
import trl_onpolicy.compare as compare
from trl_onpolicy.compare import report as compare_report
from trl_onpolicy.compare import Comparison, load_config_file, parse_config

SETS = [
    {"name": "in_domain", "task": "chain_sum", "n": 4, "seed": 1, "task_kwargs": {"min_terms": 2, "max_terms": 2, "max_digits": 1}},
    {"name": "facts", "task": "facts", "n": 3, "role": "retention"},
]
METRICS = {"kl_n": 3, "general_n": 3, "kl_max_new_tokens": 5, "nll_n": 3, "batch_size": 4}


def _recipe(tmp_path, model_dir, methods, name="compare.yaml", **extra):
    raw = {
        "model_name_or_path": str(model_dir),
        "output_dir": str(tmp_path / "out"),
        "num_threads": 1,
        "methods": methods,
        "data": {"task": "chain_sum", "n": 4, "task_kwargs": {"min_terms": 2, "max_terms": 2, "max_digits": 1}},
        "budget": {"max_steps": 2, "per_device_train_batch_size": 2, "max_length": 96},
        "eval": {"max_new_tokens": 6, "batch_size": 8, "sets": SETS},
        "metrics": METRICS,
        "phi": {"max_samples": 4},
        **extra,
    }
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture
def run_calls(monkeypatch):
    """Every unit that really runs (resume must skip finished ones)."""
    calls = []
    original = Comparison.run_unit

    def counting(self, unit):
        calls.append(unit.key)
        return original(self, unit)

    monkeypatch.setattr(Comparison, "run_unit", counting)
    return calls


def _unit_file(out, key):
    """methods/<label>/lr<rate>_seed<seed>/result.json for a unit key ``label/lr=<rate>/seed=<seed>``."""
    label, *parts = key.split("/")
    return out / "methods" / label / "_".join(p.replace("=", "") for p in parts) / "result.json"


def _units(tmp_path):
    return json.loads((tmp_path / "out" / "results.json").read_text())["units"]


def test_sweep_two_methods_two_rates_two_seeds(tmp_path, tiny_model_dir, run_calls):
    sweep = {"seeds": [0, 1], "learning_rates": [1e-3, 1e-2]}
    path = _recipe(tmp_path, tiny_model_dir, ["base", "sft", "dft"], sweep=sweep, contrasts=["sft vs dft"])
    assert compare.main(["--config", str(path)]) == 0
    out = tmp_path / "out"
    # base once (greedy evaluation has no seed), then seed by seed every method x rate
    assert run_calls == ["base"] + [f"{m}/lr={lr}/seed={s}" for s in (0, 1) for m in ("sft", "dft") for lr in ("1e-3", "1e-2")]
    payload = json.loads((out / "results.json").read_text())
    units = payload["units"]
    assert all(u["status"] == "ok" for u in units.values()), units
    raw = {k: json.loads(_unit_file(out, k).read_text()) for k in units if k != "base"}
    assert raw["sft/lr=1e-2/seed=1"]["learning_rate"] == 1e-2 and raw["sft/lr=1e-2/seed=1"]["seed"] == 1
    assert raw["sft/lr=1e-2/seed=1"]["steps"] == 2
    # the trainer really ran at the unit's rate: the logged rate of a constant schedule
    assert {h["learning_rate"] for h in raw["dft/lr=1e-3/seed=0"]["log_history"] if "learning_rate" in h} == {1e-3}
    # two seeds of one method/rate train different models; the same seed is reproducible across rates' data order
    assert raw["sft/lr=1e-3/seed=0"]["metrics"]["kl_in_domain"]["mean"] != raw["sft/lr=1e-3/seed=1"]["metrics"]["kl_in_domain"]["mean"]
    base = json.loads((out / "methods" / "base" / "result.json").read_text())
    assert base["metrics"]["kl_in_domain"]["mean"] == 0.0
    for r in raw.values():
        assert r["metrics"]["kl_in_domain"]["mean"] > 0 and r["metrics"]["kl_general"]["mean"] > 0
        assert math.isfinite(r["metrics"]["heldout_nll"]["mean"])

    # aggregation: mean and Student-t interval over the two seeds, recomputed here from the unit files
    groups = {(g["label"], g["learning_rate"]): g for g in payload["groups"]}
    g = groups[("dft", 1e-2)]
    kls = [raw[f"dft/lr=1e-2/seed={s}"]["metrics"]["kl_in_domain"]["mean"] for s in (0, 1)]
    half = 12.706 * statistics.stdev(kls) / math.sqrt(2)
    assert g["metrics"]["kl_in_domain"]["mean"] == pytest.approx(statistics.mean(kls))
    assert g["metrics"]["kl_in_domain"]["ci_low"] == pytest.approx(statistics.mean(kls) - half)
    accs = [raw[f"dft/lr=1e-2/seed={s}"]["eval"]["in_domain"]["accuracy"] for s in (0, 1)]
    base_acc = base["eval"]["in_domain"]["accuracy"]
    assert g["metrics"]["in_domain_gain"]["mean"] == pytest.approx(statistics.mean(accs) - base_acc)
    # per-seed Wilson intervals kept in the unit summaries
    u = units["dft/lr=1e-2/seed=0"]["sets"]["facts"]
    assert u["ci_method"] == "wilson" and u["ci_low"] <= u["accuracy"] <= u["ci_high"]

    # pairing: dft - sft on the same seed at the same rate
    paired = {(p["label"], p["learning_rate"]): p for p in payload["paired"]}
    p = paired[("dft", 1e-3)]
    assert p["sft_learning_rate"] == 1e-3 and p["seeds"] == [0, 1]
    diffs = [raw[f"dft/lr=1e-3/seed={s}"]["metrics"]["heldout_nll"]["mean"] - raw[f"sft/lr=1e-3/seed={s}"]["metrics"]["heldout_nll"]["mean"]
             for s in (0, 1)]
    assert p["diff"]["heldout_nll"]["mean"] == pytest.approx(statistics.mean(diffs))
    assert p["diff"]["heldout_nll"]["ci_high"] == pytest.approx(statistics.mean(diffs) + 12.706 * statistics.stdev(diffs) / math.sqrt(2))

    # a recipe contrast, the other way round: sft - dft at every rate, on the seeds both finished
    contrast = {c["learning_rate"]: c for c in payload["contrasts"]}
    assert set(contrast) == {1e-3, 1e-2} and contrast[1e-3]["reference"] == "dft"
    assert contrast[1e-3]["diff"]["heldout_nll"]["mean"] == pytest.approx(-statistics.mean(diffs))

    assert (out / "frontier.png").stat().st_size > 5000
    assert (out / "compare_accuracy.png").stat().st_size > 1000
    md = (out / "results.md").read_text()
    assert "## Frontier summary" in md and "## Paired differences vs SFT" in md and "frontier.png" in md
    assert "## Contrasts (a − b on the same seed and learning rate" in md and "| sft | 1e-3 | dft | 2 |" in md
    assert "## Each method at its best rate vs SFT at its best rate" in md and [r["label"] for r in payload["best_vs_best"]] == ["dft"]
    assert "| dft | 1e-2 | 2/2 |" in md
    best_sft = max((1e-3, 1e-2), key=lambda lr: groups[("sft", lr)]["metrics"]["in_domain_gain"]["mean"])
    assert f"sft {'1e-3' if best_sft == 1e-3 else '1e-2'}" in md.split("Best learning rate per method")[1].splitlines()[0]
    # the base model's samples for the KL were generated once and cached with their fingerprint
    cached = json.loads((out / "corpora" / "base_samples_general.json").read_text())
    assert len(cached["responses"]) == METRICS["general_n"] and set(cached["fingerprint"]) >= {"model", "settings"}


def test_t_interval_matches_reference():
    stat = compare_report.t_interval([0.1, 0.4, 0.25])
    sd = statistics.stdev([0.1, 0.4, 0.25])
    assert stat["mean"] == pytest.approx(0.25)
    assert stat["ci_high"] - stat["mean"] == pytest.approx(4.303 * sd / math.sqrt(3))
    assert compare_report.t_interval([0.3])["ci_low"] is None
    assert compare_report.t_interval([None]) is None
    # a share's interval is clipped to the possible range (three seeds at 97%, 100%, 100%: unclipped it passes 100%)
    shares = [0.97, 1.0, 1.0]
    raw = compare_report.t_interval(shares)
    clipped = compare_report.t_interval(shares, bounds=(0.0, 1.0))
    assert raw["ci_high"] > 1.0 and clipped["ci_high"] == 1.0
    assert clipped["ci_low"] == pytest.approx(raw["ci_low"]) and clipped["mean"] == pytest.approx(raw["mean"])


def test_entries_of_one_label_add_units(tmp_path, tiny_model_dir):
    """A rate scan at one seed, then the best rate at every seed: two entries of one method, one set of units (the unit
    both name runs once) under one label, so the report groups them together."""
    methods = ["base", {"name": "dpo", "args": {"beta": 0.1}, "learning_rates": [1e-3, 1e-2], "seeds": [0]},
               {"name": "dpo", "args": {"beta": 0.1}, "learning_rates": [1e-3], "seeds": [0, 1, 2]}]
    path = _recipe(tmp_path, tiny_model_dir, methods)
    comparison = Comparison(compare.load_config_file(str(path), {}))
    keys = [u.key for u in comparison.units()]
    assert keys == ["base", "dpo/lr=1e-3/seed=0", "dpo/lr=1e-2/seed=0", "dpo/lr=1e-3/seed=1", "dpo/lr=1e-3/seed=2"]
    assert len({comparison.result_path(u) for u in comparison.units()}) == 5
    only = Comparison(compare.load_config_file(str(path), {"only": "dpo"}))
    assert [u.key for u in only.units()] == keys[1:]


def test_best_rate_vs_best_rate_pairs_on_seed():
    """Each method's best-rate group against SFT's best-rate group, paired seed by seed (a naive recomputation)."""
    acc = {  # (label, lr) -> in-domain accuracy per seed
        ("sft", 1e-5): [0.30, 0.32, 0.28], ("sft", 3e-5): [0.50, 0.44, 0.47],
        ("idft", 1e-5): [0.20, 0.15, 0.16], ("idft", 3e-5): [0.10, 0.40, 0.30],  # 3e-5 has the higher mean
        ("dpo", 1e-5): [0.40, 0.30, None],  # seed 2 failed: paired on seeds 0 and 1 only
    }
    groups = [{"label": "base", "method": "base", "learning_rate": None, "per_seed": {None: {"in_domain_acc": 0.17}},
               "metrics": {"in_domain_gain": {"mean": 0.0}}}]
    for (label, lr), values in acc.items():
        per_seed = {s: {m: (v if m == "in_domain_acc" else 0.0) for m in compare_report.PAIRED}
                    for s, v in enumerate(values) if v is not None}
        gain = statistics.mean(v - 0.17 for v in values if v is not None)
        groups.append({"label": label, "method": label, "learning_rate": lr, "per_seed": per_seed,
                       "metrics": {"in_domain_gain": {"mean": gain}}})
    rows = {r["label"]: r for r in compare_report.best_vs_best(groups)}
    assert set(rows) == {"idft", "dpo"}  # neither base nor SFT against itself
    assert rows["idft"]["learning_rate"] == 3e-5 and rows["idft"]["sft_learning_rate"] == 3e-5
    diffs = [a - b for a, b in zip(acc[("idft", 3e-5)], acc[("sft", 3e-5)])]
    d = rows["idft"]["diff"]["in_domain_acc"]
    assert d["mean"] == pytest.approx(statistics.mean(diffs))
    assert d["ci_low"] == pytest.approx(statistics.mean(diffs) - 4.303 * statistics.stdev(diffs) / math.sqrt(3))
    assert rows["dpo"]["seeds"] == [0, 1]
    assert rows["dpo"]["diff"]["in_domain_acc"]["mean"] == pytest.approx(statistics.mean([0.40 - 0.50, 0.30 - 0.44]))


def test_resume_after_a_half_finished_sweep(tmp_path, tiny_model_dir, run_calls, monkeypatch):
    # the first run dies (as if killed) while training the third unit
    original = Comparison.train
    seen = []

    def die_on_third(self, unit, model, tokenizer):
        seen.append(unit.key)
        if len(seen) == 3:
            raise KeyboardInterrupt
        return original(self, unit, model, tokenizer)

    monkeypatch.setattr(Comparison, "train", die_on_third)
    path = _recipe(tmp_path, tiny_model_dir, ["base", "sft"], sweep={"seeds": [0, 1], "learning_rates": [1e-3, 1e-2]})
    with pytest.raises(KeyboardInterrupt):
        compare.main(["--config", str(path)])
    out = tmp_path / "out"
    done = ["base", "sft/lr=1e-3/seed=0", "sft/lr=1e-2/seed=0"]
    files = {k: _unit_file(out, k) for k in done[1:]}
    files["base"] = out / "methods" / "base" / "result.json"
    assert all(f.is_file() for f in files.values())
    assert not (out / "methods" / "sft" / "lr1e-3_seed1" / "result.json").exists()
    mtimes = {k: f.stat().st_mtime_ns for k, f in files.items()}

    monkeypatch.setattr(Comparison, "train", original)
    run_calls.clear()
    # an interim report runs nothing, reports the finished units and exits 1 while units are missing
    assert compare.main(["--config", str(path), "--report_only", "true"]) == 1
    assert run_calls == [] and set(_units(tmp_path)) == set(done)
    assert {k: f.stat().st_mtime_ns for k, f in files.items()} == mtimes
    assert compare.main(["--config", str(path)]) == 0
    assert run_calls == ["sft/lr=1e-3/seed=1", "sft/lr=1e-2/seed=1"]  # finished units are not run again
    assert {k: f.stat().st_mtime_ns for k, f in files.items()} == mtimes
    assert all(u["status"] == "ok" for u in _units(tmp_path).values())


def test_two_shards_share_one_sweep(tmp_path, tiny_model_dir, run_calls):
    extra = {"sweep": {"learning_rates": [1e-3, 1e-2]}, "metrics": {**METRICS, "kl": False, "nll": False}}
    path = _recipe(tmp_path, tiny_model_dir, ["base", "sft"], **extra)
    assert compare.main(["--config", str(path), "--shard", "1/2"]) == 0
    assert run_calls == ["sft/lr=1e-3/seed=0"] and list(_units(tmp_path)) == ["sft/lr=1e-3/seed=0"]
    assert compare.main(["--config", str(path), "--shard", "0/2"]) == 0
    assert run_calls == ["sft/lr=1e-3/seed=0", "base", "sft/lr=1e-2/seed=0"]
    # the last shard's report holds every unit; an unsharded re-run has nothing left to do
    assert set(_units(tmp_path)) == {"base", "sft/lr=1e-3/seed=0", "sft/lr=1e-2/seed=0"}
    assert compare.main(["--config", str(path)]) == 0 and len(run_calls) == 3
    with pytest.raises(ValueError, match="shard='2/2' is invalid"):
        compare.main(["--config", str(path), "--shard", "2/2"])


def test_auto_shard_skips_units_another_process_holds(tmp_path, tiny_model_dir, run_calls, capsys):
    import fcntl

    extra = {"sweep": {"learning_rates": [1e-3, 1e-2]}, "metrics": {**METRICS, "kl": False, "nll": False}}
    path = _recipe(tmp_path, tiny_model_dir, ["base", "sft"], **extra)
    comparison = Comparison(compare.load_config_file(str(path), {}))
    held = next(u for u in comparison.units() if u.key == "sft/lr=1e-3/seed=0")
    claim = comparison.claim_path(held)
    claim.parent.mkdir(parents=True)
    with open(claim, "a") as fh:  # "another process" (an independent open file, as a second process would have)
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert compare.main(["--config", str(path), "--shard", "auto"]) == 0
        assert run_calls == ["base", "sft/lr=1e-2/seed=0"]
        assert "sft/lr=1e-3/seed=0: another process is running it, skipping" in capsys.readouterr().out
        assert set(_units(tmp_path)) == {"base", "sft/lr=1e-2/seed=0"}
        # a fixed shard respects the claim too: nothing is trained twice
        assert compare.main(["--config", str(path)]) == 0 and len(run_calls) == 2
    # released (the holder exited): the next process takes it, and its report holds every unit
    assert compare.main(["--config", str(path), "--shard", "auto"]) == 0
    assert run_calls == ["base", "sft/lr=1e-2/seed=0", "sft/lr=1e-3/seed=0"]
    assert set(_units(tmp_path)) == {"base", "sft/lr=1e-3/seed=0", "sft/lr=1e-2/seed=0"}


def test_stale_units_are_recomputed(tmp_path, tiny_model_dir, run_calls, capsys):
    import shutil

    from transformers import AutoModelForCausalLM

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    path = _recipe(tmp_path, model_dir, ["base", "sft"], metrics={**METRICS, "kl": False})
    assert compare.main(["--config", str(path)]) == 0
    assert run_calls == ["base", "sft/lr=1e-5/seed=0"]

    # a budget setting changed: sft is recomputed, base (which trains nothing) is reused
    run_calls.clear()
    path = _recipe(tmp_path, model_dir, ["base", "sft"], metrics={**METRICS, "kl": False},
                   budget={"max_steps": 3, "per_device_train_batch_size": 2, "max_length": 96})
    assert compare.main(["--config", str(path)]) == 0
    assert run_calls == ["sft/lr=1e-5/seed=0"]
    assert "budget.max_steps: 2 -> 3" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "methods" / "sft" / "lr1e-5_seed0" / "result.json").read_text())["steps"] == 3

    # the training data changed: both trained units and the cached phi are redone, base's accuracy is reused
    run_calls.clear()
    path = _recipe(tmp_path, model_dir, ["base", "sft"], metrics={**METRICS, "kl": False},
                   budget={"max_steps": 3, "per_device_train_batch_size": 2, "max_length": 96},
                   data={"task": "chain_sum", "n": 4, "seed": 7, "task_kwargs": {"min_terms": 2, "max_terms": 2, "max_digits": 1}})
    assert compare.main(["--config", str(path)]) == 0
    assert run_calls == ["base", "sft/lr=1e-5/seed=0"]  # base records the reference corpus' phi: data is in its fingerprint
    assert "different data" in capsys.readouterr().out

    # the start model's weights changed in the same folder: everything is recomputed
    run_calls.clear()
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        next(model.parameters()).add_(0.01)
    model.save_pretrained(model_dir)
    assert compare.main(["--config", str(path)]) == 0
    assert run_calls == ["base", "sft/lr=1e-5/seed=0"]
    assert "different model" in capsys.readouterr().out
    # and a run with nothing changed reuses everything
    run_calls.clear()
    assert compare.main(["--config", str(path)]) == 0
    assert run_calls == []


def test_failures_exit_nonzero_and_others_go_on(tmp_path, tiny_model_dir, monkeypatch, run_calls):
    original = Comparison.train

    def flaky(self, unit, model, tokenizer):
        if unit.spec.name == "dft":
            raise RuntimeError("boom in dft")
        return original(self, unit, model, tokenizer)

    monkeypatch.setattr(Comparison, "train", flaky)
    monkeypatch.setitem(sys.modules, "trl_onpolicy.trainer.online", None)  # as if the module were not installed
    # an earlier test in this process may have imported it: `from . import x` reads the package attribute first
    monkeypatch.delattr(trl_onpolicy, "hinted_online", raising=False)
    monkeypatch.delattr(trl_onpolicy.trainer, "online", raising=False)
    path = _recipe(tmp_path, tiny_model_dir, ["dft", "idft_online", "sft"], metrics={**METRICS, "kl": False, "nll": False})
    assert compare.main(["--config", str(path)]) == 1
    units = _units(tmp_path)
    assert units["dft/lr=1e-5/seed=0"]["status"] == "failed" and "boom in dft" in units["dft/lr=1e-5/seed=0"]["error"]
    assert units["idft_online/lr=1e-5/seed=0"]["status"] == "unavailable"
    assert units["sft/lr=1e-5/seed=0"]["status"] == "ok"
    md = (tmp_path / "out" / "results.md").read_text()
    assert "boom in dft" in md and "trl_onpolicy.trainer.online" in md
    # a failed unit is retried on the next run, a finished one is not
    monkeypatch.setattr(Comparison, "train", original)
    run_calls.clear()
    assert compare.main(["--config", str(path), "--methods", "dft,sft"]) == 0
    assert run_calls == ["dft/lr=1e-5/seed=0"]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"eval": {"sets": [{"name": "mine", "path": "/nonexistent/eval.jsonl"}]}}, "/nonexistent/eval.jsonl"),
        ({"methods": ["base", "ppo"]}, "Unknown method 'ppo'"),
        ({"sweep": {"learning_rates": [1e-4, float("nan")]}}, "sweep.learning_rates[1]=nan is invalid"),
        ({"methods": [{"name": "sft", "learning_rates": [float("inf")]}]}, "learning_rates[0]=inf is invalid"),
        ({"methods": [{"name": "dpo", "args": {"beta": -1.0}}]}, "methods[dpo].args.beta=-1.0 is invalid"),
        ({"methods": [{"name": "dpo", "args": {"beta": 0.1}}, {"name": "dpo", "args": {"beta": 0.5}}]},
         "Two `methods` entries use the label 'dpo' with different settings"),
        ({"methods": [{"name": "sft", "label": "x"}, {"name": "dft", "label": "x"}]}, "use the label 'x' with different settings"),
        ({"methods": [{"name": "sft", "args": {"no_such_field": 1}}]}, "no_such_field"),
        ({"budget": {"max_steps": 0}}, "budget.max_steps=0 is invalid"),
        ({"eval": {"temperature": float("nan"), "sets": SETS}}, "eval.temperature=nan is invalid"),
        ({"sweep": {"seeds": [0, 0]}}, "distinct"),
        ({"metrics": {**METRICS, "nll_n": 500}}, "metrics (held-out NLL rows): Only"),
        ("output_dir inside the model", None),
        ({"shard": "1/1"}, "shard='1/1' is invalid"),
        ({"contrasts": ["idft vs sft"]}, "contrasts[0]='idft vs sft' is invalid: expected 'a vs b' with two method labels"),
        ({"contrasts": ["sft - base"]}, "contrasts[0]='sft - base' is invalid"),
        ({"contrasts": "sft vs base"}, "contrasts='sft vs base' is invalid"),
        ({"metrics": {**METRICS, "kl_n": 0}}, "metrics.kl_n=0 is invalid"),
        ({"data": {"path": "/nonexistent/train.jsonl"}}, "/nonexistent/train.jsonl"),
        ({"metrics": {**METRICS, "general_prompts": "/nonexistent/general.jsonl"}}, "/nonexistent/general.jsonl"),
    ],
)
def test_validation_before_any_training(tmp_path, tiny_model_dir, run_calls, change, message):
    if change == "output_dir inside the model":
        change = {"output_dir": str(tiny_model_dir / "compare_out")}
        message = "would overwrite the input"
    path = _recipe(tmp_path, tiny_model_dir, ["base", "sft"], **{k: v for k, v in change.items() if k != "methods"})
    if "methods" in change:
        raw = yaml.safe_load(path.read_text())
        raw["methods"] = change["methods"]
        path.write_text(yaml.safe_dump(raw))
    with pytest.raises((ValueError, FileNotFoundError)) as err:
        compare.main(["--config", str(path)])
    assert message in str(err.value)
    assert run_calls == [] and not (tmp_path / "out").exists() and not (tiny_model_dir / "compare_out").exists()


def test_cli_error_is_one_line_exit_2(tmp_path, tiny_model_dir, capsys):
    from trl_onpolicy.cli.commands import main as cli

    path = _recipe(tmp_path, tiny_model_dir, ["base"], sweep={"learning_rates": [".nan"]})
    raw = yaml.safe_load(path.read_text())
    raw["sweep"] = {"learning_rates": [float("nan")]}
    path.write_text(yaml.safe_dump(raw))
    assert cli(["compare", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("trl-onpolicy compare: error: sweep.learning_rates[0]=nan is invalid") and "Traceback" not in err
    assert cli(["compare", "--config"]) == 2


def test_recipe_errors_name_the_key(tmp_path, tiny_model_dir):
    good = yaml.safe_load(_recipe(tmp_path, tiny_model_dir, ["base"]).read_text())
    with pytest.raises(ValueError, match="max_step"):
        parse_config({**good, "budget": {"max_step": 3}})
    with pytest.raises(ValueError, match="shared `budget`"):
        parse_config({**good, "methods": [{"name": "sft", "args": {"max_steps": 100}}]})
    with pytest.raises(ValueError, match="both args.learning_rate and learning_rates"):
        parse_config({**good, "methods": [{"name": "sft", "args": {"learning_rate": 1e-4}, "learning_rates": [1e-4]}]})
    with pytest.raises(ValueError, match="label 'sft' with different settings"):
        parse_config({**good, "methods": ["sft", {"name": "dft", "label": "sft"}]})
    with pytest.raises(ValueError, match="Unknown top-level"):
        parse_config({**good, "modle": "x"})
    with pytest.raises(ValueError, match="eval.sets"):
        parse_config({**good, "eval": {}})
    with pytest.raises(ValueError, match="output_dir"):
        parse_config({k: v for k, v in good.items() if k != "output_dir"})
    cfg = load_config_file(tmp_path / "compare.yaml", {"methods": "base,idft"})
    assert [m.label for m in cfg.method_specs] == ["base", "idft"]
    cfg = parse_config({**good, "methods": ["base", "sft", {"name": "dpo", "args": {"beta": 0.2}}], "only": "base,dpo"})
    assert [(m.label, m.args) for m in cfg.method_specs] == [("base", {}), ("dpo", {"beta": 0.2})]
    with pytest.raises(ValueError, match="only='sft,simpo' is invalid"):
        parse_config({**good, "methods": ["sft"], "only": "sft,simpo"})
    # a method's args.learning_rate is its one-rate grid; per-method grids and seeds replace the sweep's
    cfg = parse_config({**good, "sweep": {"seeds": [0, 1, 2], "learning_rates": [1e-5, 1e-4]},
                        "methods": ["base", "sft", {"name": "dpo", "args": {"learning_rate": 5e-6, "beta": 0.1}},
                                    {"name": "simpo", "learning_rates": [1e-6], "seeds": [0]}]})
    units = [u.key for u in Comparison(cfg).units()]
    assert units[0] == "base" and len(units) == 1 + 3 * 2 + 3 * 1 + 1
    assert "dpo/lr=5e-6/seed=2" in units and "simpo/lr=1e-6/seed=0" in units and "simpo/lr=1e-6/seed=1" not in units
    # sampled evaluation: base is evaluated once per seed
    cfg = parse_config({**good, "sweep": {"seeds": [0, 1]}, "methods": ["base"],
                        "eval": {**good["eval"], "temperature": 1.0, "num_samples": 2}})
    assert [u.key for u in Comparison(cfg).units()] == ["base/seed=0", "base/seed=1"]


def test_shipped_compare_recipes_parse():
    from pathlib import Path

    recipes = sorted((Path(__file__).parent.parent / "recipes" / "compare").glob("*.yaml"))
    assert recipes
    for path in recipes:
        cfg = load_config_file(path)
        assert cfg.method_specs and cfg.eval_sets and Comparison(cfg).units()


def test_hinted_corpus_falls_back_to_references(tmp_path, tiny_model_dir):
    # a random tiny model never gets the answer right, so the realign filters drop every re-aligned response and the
    # default fallback trains on the reference for each of them: same prompts as the other methods, counted exactly
    path = _recipe(tmp_path, tiny_model_dir, ["sft_hinted"], hinted={"max_new_tokens": 6, "batch_size": 4},
                   metrics={**METRICS, "kl": False, "nll": False})
    assert compare.main(["--config", str(path)]) == 0
    result = json.loads((tmp_path / "out" / "methods" / "sft_hinted" / "lr1e-5_seed0" / "result.json").read_text())
    assert result["status"] == "ok", result.get("error")
    hinted = result["hinted_summary"]
    assert hinted["num_kept"] == hinted["num_realigned_used"] == 0
    assert hinted["num_reference_used"] == result["num_train_samples"] == 4
    assert result["corpus"] == "hinted_reference"


def test_token_counter_counts_each_sequence_once():
    class FakeTrainer:
        def __init__(self):
            self.callbacks = []

        def training_step(self, model, inputs, *args, **kwargs):
            return 0.0

        def add_callback(self, cb):
            self.callbacks.append(cb)

    trainer = FakeTrainer()
    counter = compare.token_counter_callback(trainer, max_tokens=None)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    trainer.training_step(None, {"input_ids": torch.zeros(2, 4), "attention_mask": mask})  # SFT / DPO batch
    assert counter["tokens"] == 5
    trainer.training_step(None, {  # CPO/SimPO batch: chosen/rejected sequences include the prompt
        "prompt_attention_mask": torch.ones(1, 2), "chosen_attention_mask": torch.ones(1, 3),
        "rejected_attention_mask": torch.tensor([[1, 1, 1, 1, 0]])})
    assert counter["tokens"] == 5 + 3 + 4
    trainer.training_step(None, {"input_ids": torch.zeros(1, 6)})  # no mask: every position
    assert counter["tokens"] == 18


def test_token_counter_counts_rollout_batches_built_from_raw_rows():
    # SDFT-like trainers receive raw rows in training_step and build the batch (student rollouts) in _prepare_inputs,
    # which a plain Trainer also calls on ready batches: each batch must be counted exactly once
    class RolloutTrainer:
        def _prepare_inputs(self, inputs):
            if isinstance(inputs, dict):
                return inputs
            return {"prompt_mask": torch.ones(len(inputs), 3), "completion_mask": torch.tensor([[1, 1, 0]] * len(inputs)),
                    "teacher_attention_mask": torch.ones(len(inputs), 9)}

        def training_step(self, model, inputs, *args, **kwargs):
            self._prepare_inputs(inputs)
            return 0.0

        def add_callback(self, cb):
            pass

    trainer = RolloutTrainer()
    counter = compare.token_counter_callback(trainer, max_tokens=None)
    trainer.training_step(None, [{"prompt": "a"}, {"prompt": "b"}])
    assert counter["tokens"] == 2 * (3 + 2)  # student prompt + completion, not the teacher's context
    trainer.training_step(None, {"attention_mask": torch.ones(1, 4)})  # a ready batch through both methods: once
    assert counter["tokens"] == 14


def test_sdft_is_a_method(tmp_path, tiny_model_dir):
    pytest.importorskip("trl_onpolicy.trainer.sdft")
    path = _recipe(tmp_path, tiny_model_dir, ["sdft"], sdft={"max_completion_length": 8},
                   metrics={**METRICS, "kl": False, "nll": False})
    assert compare.main(["--config", str(path)]) == 0
    result = json.loads(_unit_file(tmp_path / "out", "sdft/lr=1e-5/seed=0").read_text())
    assert result["status"] == "ok" and result["steps"] == 2 and result["tokens_trained"] > 0
    assert result["corpus"] == "reference" and result["settings"]["sdft"] == {"max_completion_length": 8}


def test_corpus_lock_is_exclusive(tmp_path):
    # shards of one sweep build each cached corpus under this lock: a second holder waits for the first
    import threading
    import time

    order = []
    lock = tmp_path / "corpora" / ".pairs.lock"

    def second():
        with file_lock(lock):
            order.append("second")

    with file_lock(lock):
        thread = threading.Thread(target=second)
        thread.start()
        time.sleep(0.3)
        order.append("first done")
    thread.join(5)
    assert order == ["first done", "second"]
