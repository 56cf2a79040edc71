"""What the second CPU study needs from `trl-onpolicy compare` (issue 19): a prompt template that reaches the training
rows and every in-domain/OOD prompt, a DEV split that chooses each method's rate, the paired item-level bootstrap and
its verdicts, the cut-off and answer-marker shares, online SFT as a method, the paper's optimizer settings, and the
study-2 recipe with its unit count and estimated cost. Recipes without the new settings keep their fingerprints."""

import json
import math
import statistics
from pathlib import Path

import numpy as np
import pytest
import yaml

import trl_onpolicy.compare as compare
from trl_onpolicy.compare import Comparison, load_config_file, parse_config
from trl_onpolicy.compare import report as compare_report
from trl_onpolicy.compare import selection, stats
from trl_onpolicy.compare.metrics import answer_shares, item_records
from trl_onpolicy.compare.units import estimate_seconds, sweep_units
from trl_onpolicy.eval.evaluation import EvalSet, load_eval_set

ROOT = Path(__file__).parent.parent
KW = {"min_terms": 2, "max_terms": 2, "max_digits": 1}
TEMPLATE = "Q: {question} (end)"


def _raw(tmp_path, model_dir, methods, **extra):
    return {
        "model_name_or_path": str(model_dir),
        "output_dir": str(tmp_path / "out"),
        "num_threads": 1,
        "methods": methods,
        "data": {"task": "chain_sum", "n": 4, "task_kwargs": KW},
        "budget": {"max_steps": 2, "per_device_train_batch_size": 2, "max_length": 96},
        "eval": {"max_new_tokens": 6, "batch_size": 8, "sets": [
            {"name": "in_domain", "task": "chain_sum", "n": 4, "seed": 1, "task_kwargs": KW},
            {"name": "products", "role": "ood", "task": "products", "n": 3, "seed": 1,
             "task_kwargs": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}},
            {"name": "own", "role": "ood", "task": "basic_arithmetic", "n": 2, "seed": 1, "prompt_template": "{question} !",
             "task_kwargs": {"min_terms": 2, "max_terms": 2, "max_digits": 1}},
            {"name": "facts", "task": "facts", "n": 3, "role": "retention"},
        ]},
        "metrics": {"kl_n": 3, "general_n": 3, "kl_max_new_tokens": 5, "nll_n": 3, "batch_size": 4},
        "phi": {"max_samples": 4},
        **extra,
    }


def _user(prompt) -> str:
    return [m["content"] for m in prompt if m["role"] == "user"][-1]


# ---- the prompt template and the DEV split ---------------------------------------------------------------------------


def test_template_reaches_training_rows_eval_prompts_and_dev(tmp_path, tiny_model_dir):
    cfg = parse_config(_raw(tmp_path, tiny_model_dir, ["base"], data={"task": "chain_sum", "n": 6, "task_kwargs": KW,
                                                                     "prompt_template": TEMPLATE, "dev_n": 5}))
    comparison = Comparison(cfg)
    train = comparison.train_rows()
    assert all(_user(r["prompt"]) == TEMPLATE.format(question=r["question"]) for r in train)
    sets = {s.name: s for s in cfg.eval_sets}
    # in-domain and OOD sets inherit it (a task of trl_onpolicy.data.datasets and a plain reasoning-gym task) ...
    for name in ("in_domain", "products"):
        users = [_user(r["prompt"]) for r in load_eval_set(sets[name])]
        assert users and all(u.startswith("Q: ") and u.endswith(" (end)") for u in users), users
    # ... a set with its own template keeps it, and the retention set is never templated
    assert all(_user(r["prompt"]).endswith(" !") and "Q: " not in _user(r["prompt"]) for r in load_eval_set(sets["own"]))
    assert not any("(end)" in _user(r["prompt"]) for r in load_eval_set(sets["facts"]))
    # the in-domain KL prompts and the held-out NLL rows are the training task's prompts: templated too
    assert all(_user(p).endswith(" (end)") for p in comparison.prompt_set("in_domain"))
    assert all(_user(r["prompt"]).endswith(" (end)") for r in comparison.nll_rows())
    # DEV: templated, as many as asked, and disjoint from the training rows and the in-domain test set
    dev = comparison.dev_rows()
    dev_users = [_user(r["prompt"]) for r in dev]
    assert len(dev) == 5 and all(u.endswith(" (end)") for u in dev_users)
    assert not set(dev_users) & {_user(r["prompt"]) for r in train}
    assert not set(dev_users) & {_user(r["prompt"]) for r in load_eval_set(sets["in_domain"])}
    # a template without {question}, or with data.path, is refused by name
    for bad in ({"prompt_template": "no field"}, {"prompt_template": "{question} {other}"}):
        with pytest.raises(ValueError, match="data.prompt_template"):
            parse_config(_raw(tmp_path, tiny_model_dir, ["base"], data={"task": "chain_sum", "n": 4, **bad}))


def test_defaults_keep_the_fingerprinted_settings(tmp_path, tiny_model_dir):
    """A recipe without the new settings fingerprints and records exactly what it did before they existed."""
    cfg = parse_config(_raw(tmp_path, tiny_model_dir, ["base", "sft"]))
    comparison = Comparison(cfg)
    unit = next(u for u in comparison.units() if u.spec.name == "sft")
    budget = comparison.unit_settings(unit)["budget"]
    assert "adam_beta2" not in budget and "warmup_ratio" not in budget
    config = comparison.config_dict()
    assert "prompt_template" not in config["data"] and "dev_n" not in config["data"]
    assert "adam_beta2" not in config["budget"] and "warmup_ratio" not in config["budget"]
    args = comparison.common_args(unit)
    assert "adam_beta2" not in args and args["warmup_steps"] == 0
    # the same rows as the generator gives without a template
    from trl_onpolicy.data.datasets import math_word_problems

    assert comparison.train_rows() == list(math_word_problems(4, seed=0, task="chain_sum", split="train", **KW))
    # set: they enter the unit's settings and the trainer configuration
    raw = _raw(tmp_path, tiny_model_dir, ["base", "sft"])
    raw["budget"].update(adam_beta2=0.95, warmup_ratio=0.1, lr_scheduler_type="cosine", weight_decay=0.01)
    comparison = Comparison(parse_config(raw))
    unit = next(u for u in comparison.units() if u.spec.name == "sft")
    assert comparison.unit_settings(unit)["budget"]["adam_beta2"] == 0.95
    config = comparison.trainer_config(unit)
    assert (config.adam_beta2, config.warmup_steps, config.lr_scheduler_type, config.weight_decay) == (0.95, 0.1, "cosine", 0.01)
    raw["budget"]["warmup_steps"] = 2
    with pytest.raises(ValueError, match="budget.warmup_ratio"):
        parse_config(raw)


def test_study2_pipeline_end_to_end(tmp_path, tiny_model_dir):
    """A tiny run with the template, a DEV split, the paper's optimizer and two rates: every unit records DEV accuracy,
    per-problem scores and the answer-format shares; the report chooses on DEV and adds the study-2 section."""
    raw = _raw(tmp_path, tiny_model_dir, ["base", {"name": "sft", "learning_rates": [1e-3, 1e-2]}, "idft", "sft_online"],
               data={"task": "chain_sum", "n": 4, "task_kwargs": KW, "prompt_template": TEMPLATE, "dev_n": 3},
               contrasts=["idft vs sft"], online={"max_new_tokens": 6})
    raw["budget"].update(max_steps=4, max_length=256, lr_scheduler_type="cosine", warmup_ratio=0.25, adam_beta2=0.95)
    path = tmp_path / "study2.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert compare.main(["--config", str(path)]) == 0
    out = tmp_path / "out"
    result = json.loads((out / "methods" / "sft" / "lr1e-3_seed0" / "result.json").read_text())
    assert set(result["items"]) == {"in_domain", "products", "own", "facts", "dev"}
    assert len(result["items"]["dev"]) == 3 and result["dev_eval"]["num_prompts"] == 3
    records = [json.loads(x) for x in (out / "methods" / "sft" / "lr1e-3_seed0" / "eval" / "in_domain.jsonl").read_text().splitlines()]
    assert result["items"]["in_domain"] == [r["score"] for r in records]
    assert result["format"]["in_domain"]["samples"] == 4
    # cosine with warm-up: the logged rate rises over the first step, then decays
    lrs = [h["learning_rate"] for h in result["log_history"] if "learning_rate" in h]
    assert lrs[0] < max(lrs) and lrs[-1] < max(lrs)
    online = json.loads((out / "methods" / "sft_online" / "lr1e-5_seed0" / "result.json").read_text())
    assert online["corpus"] == "online" and any("hinted/acceptance_rate" in h for h in online["log_history"])
    payload = json.loads((out / "results.json").read_text())
    assert payload["selection"]["selected_on_dev"] is True and set(payload["selection"]["chosen"]) >= {"sft", "idft"}
    md = (out / "results.md").read_text()
    assert "## Selection on the DEV split" in md and "highest mean DEV-split accuracy" in md
    assert "Item-level paired bootstrap" in md and "facts: 3 problems" in md


def test_sft_online_builds_an_online_sft_trainer(tmp_path, tiny_model_dir):
    from trl import SFTConfig

    from trl_onpolicy.compare.methods import REGISTRY
    from trl_onpolicy.trainer.idft_trainer import IDFTTrainer
    from trl_onpolicy.trainer.online import OnlineSFTTrainer

    cfg = parse_config(_raw(tmp_path, tiny_model_dir, ["sft_online"], online={"max_new_tokens": 4}))
    comparison = Comparison(cfg)
    unit = comparison.units()[0]
    config = comparison.trainer_config(unit)
    assert type(config) is SFTConfig and config.remove_unused_columns is False
    model, tokenizer = comparison.load_base()
    method = REGISTRY["sft_online"]
    info = {}
    data = method.corpus(comparison, model, tokenizer, info)
    trainer = method.trainer(comparison, unit, config, model.float(), tokenizer, data)
    assert isinstance(trainer, OnlineSFTTrainer) and not isinstance(trainer, IDFTTrainer)
    assert trainer._hinted_collator is not None and trainer._hinted_collator.settings.max_new_tokens == 4
    assert info["corpus"] == "online" and "online" in comparison.unit_settings(unit)


# ---- DEV selection -------------------------------------------------------------------------------------------------


def _unit(label, lr, seed, test, dev=None, items=None, method=None):
    r = {"key": f"{label}/{lr}/{seed}", "label": label, "method": method or label, "learning_rate": lr, "seed": seed,
         "status": "ok", "eval": {"in_domain": {"accuracy": test, "ci_low": test, "ci_high": test, "num_prompts": 10}}}
    if dev is not None:
        r["dev_eval"] = {"accuracy": dev}
    if items is not None:
        r["items"] = items
    return r


SETS = [EvalSet(name="in_domain", task="chain_sum")]


def _chosen(results, label):
    agg = compare_report.aggregate(results, SETS)
    return compare_report.best_group([g for g in agg["groups"] if g["label"] == label])["learning_rate"]


def test_dev_selection_ignores_the_test_sets():
    # on the test set 1e-2 wins (0.8 vs 0.1); on DEV 1e-3 wins (0.9 vs 0.2): the DEV choice is taken
    units = [_unit("base", None, None, 0.05)]
    units += [_unit("sft", 1e-3, s, 0.1, dev=0.9) for s in (0, 1, 2)] + [_unit("sft", 1e-2, s, 0.8, dev=0.2) for s in (0, 1, 2)]
    results = {u["key"]: u for u in units}
    assert _chosen(results, "sft") == 1e-3
    # without a DEV split the same results choose on the test set (the rule the first study used)
    for u in results.values():
        u.pop("dev_eval", None)
    assert _chosen(results, "sft") == 1e-2


def test_dev_selection_compares_rates_on_the_seeds_all_of_them_ran():
    # a seed-0 scan (1e-3: 0.6 on DEV; 1e-2: 0.5), then 1e-2 also at seeds 1 and 2 (0.9 each): its three-seed mean
    # (0.77) must not beat 1e-3's single seed; on the shared seed 0, 1e-3 is better
    units = [_unit("sft", 1e-3, 0, 0.3, dev=0.6), _unit("sft", 1e-2, 0, 0.3, dev=0.5),
             _unit("sft", 1e-2, 1, 0.3, dev=0.9), _unit("sft", 1e-2, 2, 0.3, dev=0.9)]
    assert _chosen({u["key"]: u for u in units}, "sft") == 1e-3


# ---- the paired bootstrap and its verdicts --------------------------------------------------------------------------


def _naive_bootstrap(a, b, resamples, seed, level=0.95):
    """The same resampling written as plain loops (the same generator draws: problems, then seeds)."""
    seeds = [s for s in a if s in b]
    n = len(a[seeds[0]])
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(resamples):
        items = [int(i) for i in rng.integers(0, n, n)]
        rows = [seeds[int(j)] for j in rng.integers(0, len(seeds), len(seeds))]
        total = 0.0
        for s in rows:
            for i in items:
                total += a[s][i] - b[s][i]
        values.append(total / (len(rows) * len(items)))
    values.sort()

    def quantile(q):  # numpy's default (linear) rule
        pos = q * (len(values) - 1)
        lo = math.floor(pos)
        return values[lo] + (values[min(lo + 1, len(values) - 1)] - values[lo]) * (pos - lo)

    tail = (1 - level) / 2
    return quantile(tail), quantile(1 - tail)


def test_paired_bootstrap_matches_a_naive_loop():
    rng = np.random.default_rng(7)
    a = {s: [float(x) for x in rng.integers(0, 2, 40)] for s in (0, 1, 2)}
    b = {s: [float(x) for x in rng.integers(0, 2, 40)] for s in (0, 1, 2)}
    got = stats.paired_bootstrap(a, b, resamples=300, seed=3)
    low, high = _naive_bootstrap(a, b, 300, 3)
    assert got["ci_low"] == pytest.approx(low) and got["ci_high"] == pytest.approx(high)
    assert got["mean"] == pytest.approx(statistics.mean(a[s][i] - b[s][i] for s in a for i in range(40)))
    assert (got["n_items"], got["n_seeds"]) == (40, 3)


def test_paired_bootstrap_width_agrees_with_normal_theory():
    """One seed, many problems: the percentile interval is close to mean +- 1.96 sd / sqrt(n)."""
    rng = np.random.default_rng(0)
    a = {0: [float(x) for x in rng.random(2000) < 0.6]}
    b = {0: [float(x) for x in rng.random(2000) < 0.5]}
    got = stats.paired_bootstrap(a, b, resamples=2000, seed=0)
    d = [x - y for x, y in zip(a[0], b[0])]
    half = 1.959964 * statistics.stdev(d) / math.sqrt(len(d))
    assert (got["ci_high"] - got["ci_low"]) / 2 == pytest.approx(half, rel=0.1)


def test_verdicts_identical_arms_and_a_constant_shift():
    rng = np.random.default_rng(1)
    a = {s: [float(x) for x in rng.integers(0, 2, 60)] for s in (0, 1, 2)}
    same = stats.paired_bootstrap(a, a, resamples=500, seed=0)
    # identical answers: the interval is [0, 0]; it contains 0 and is no ordering either way
    assert same["ci_low"] <= 0 <= same["ci_high"] and same["zero_width"]
    assert "not an ordering" in stats.verdict(same, "a", "b")
    # three seeds that tie exactly (the first study's case) give a zero-width t-interval: never an ordering
    tied = compare_report.t_interval([0.1, 0.1, 0.1])
    assert tied["ci_low"] > 0 and "not an ordering" in stats.verdict(tied)
    # b answers 12 more of the 60 problems right on every seed: detected, in the right direction
    b = {s: list(v) for s, v in a.items()}
    flipped = [i for i in range(60) if a[0][i] == 0][:12]
    for s in b:
        for i in flipped:
            b[s][i] = 1.0 if a[s][i] == 0 else b[s][i]
    shift = stats.paired_bootstrap(b, a, resamples=500, seed=0)
    assert shift["ci_low"] > 0 and not shift["zero_width"] and stats.verdict(shift, "b", "a") == "b > a"
    assert stats.verdict(stats.paired_bootstrap(a, b, resamples=500, seed=0), "a", "b") == "a < b"
    # arms that differ both ways about equally: not resolved
    c = {s: [1.0 - x if i % 2 else x for i, x in enumerate(v)] for s, v in a.items()}
    mixed = stats.paired_bootstrap(a, c, resamples=500, seed=0)
    assert mixed["ci_low"] < 0 < mixed["ci_high"] and stats.verdict(mixed).startswith("not resolved")


def test_min_detectable_difference_at_the_facts_size():
    from statistics import NormalDist

    z = NormalDist().inv_cdf(0.975) + NormalDist().inv_cdf(0.8)
    assert stats.min_detectable_difference(60, 0.5) == pytest.approx(z * math.sqrt(2 * 0.25 / 60))
    assert stats.min_detectable_difference(60, 1.0) == pytest.approx(1 / 60)  # never below one problem
    assert stats.min_detectable_difference(240, 0.5) == pytest.approx(stats.min_detectable_difference(60, 0.5) / 2)


# ---- cut-off and marker shares -----------------------------------------------------------------------------------


def test_cut_off_and_marker_shares_against_a_hand_count(tmp_path):
    records = [
        {"score": 1.0, "samples": [{"response": "2 + 3 = 5\n#### 5", "finished": True}]},
        {"score": 0.0, "samples": [{"response": "2 + 3 = 5 and then it goes on", "finished": False}]},
        {"score": 0.0, "samples": [{"response": "#### 7", "finished": True}]},
        {"score": 1.0, "samples": [{"response": "The answer is 9", "finished": True}]},
        {"score": 0.0, "samples": [{"response": "1 + 1 = 2 ###", "finished": False}]},
    ]
    # by hand: cut off 2 of 5 (rows 2 and 5); '####' in 2 of 5 (rows 1 and 3; row 5 has only three #)
    assert answer_shares(records, "####") == {"cut_off": 0.4, "marker": 0.4, "samples": 5}
    (tmp_path / "chain_sum.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    got = item_records(tmp_path, ["chain_sum", "missing"], "####")
    assert got["items"] == {"chain_sum": [1.0, 0.0, 0.0, 1.0, 0.0]} and set(got["format"]) == {"chain_sum"}
    # pooled over the sets of a role by their sample counts
    r = {"format": {"x": {"cut_off": 0.5, "marker": 1.0, "samples": 2}, "y": {"cut_off": 0.0, "marker": 0.0, "samples": 6}}}
    pooled = selection.role_shares(r, [EvalSet(name="x", task="chain_sum", role="ood"), EvalSet(name="y", task="chain_sum", role="ood")], "ood")
    assert pooled == {"cut_off": pytest.approx(1 / 8), "marker": pytest.approx(2 / 8)}


# ---- the study-2 recipe --------------------------------------------------------------------------------------------


def test_study2_recipe_parses_with_its_unit_count_and_cost(capsys):
    path = ROOT / "recipes" / "compare" / "smollm2_study2.yaml"
    cfg = load_config_file(path)
    labels = [s.label for s in cfg.method_specs]
    assert set(labels) == {"base", "sft", "dft", "idft", "idft_v1", "eaft", "idft_online", "sft_online"}
    assert next(s for s in cfg.method_specs if s.label == "idft_v1").args == {"idft_detach": "gamma"}
    assert (cfg.budget.max_steps, cfg.budget.adam_beta2, cfg.budget.warmup_ratio, cfg.budget.lr_scheduler_type) == (32, 0.95, 0.1, "cosine")
    assert cfg.data.dev_n and "{question}" in cfg.data.prompt_template and cfg.eval_config.max_new_tokens == 64
    roles = {s.name: (s.role, s.prompt_template) for s in cfg.eval_sets}
    assert roles["chain_sum"] == ("in_domain", cfg.data.prompt_template) and roles["products"][1] == cfg.data.prompt_template
    assert roles["facts"] == ("retention", "{question}")
    units = sweep_units(cfg)
    keys = [u.key for u in units]
    # pass 1 (the DEV scan, with the amendment's 1e-4): base + 7 methods x 3 rates at seed 0; pass 2: each label at
    # its chosen rate (3e-5 for all), seeds 1 and 2
    assert len(units) == 1 + 7 * 3 + 7 * 2 == 36 and len(set(keys)) == 36
    assert sum(u.seed == 0 for u in units) == 21 and sum(u.seed in (1, 2) for u in units) == 14
    assert all(u.lr == 3e-5 for u in units if u.seed in (1, 2))
    assert compare.main(["--config", str(path), "--dry_run", "true"]) == 0
    printed = capsys.readouterr().out
    assert "dry run: 36 units" in printed
    hours = estimate_seconds(cfg, units)["wall_hours"]
    print(printed)
    print(f"study 2: {len(units)} units, estimated {hours:.2f} h wall on 2 cores")
    assert 2.5 < hours <= 3.2  # the amendment's 7 units put it over the 2.5 h (docs/results.md)


def test_cost_estimate_is_calibrated_on_the_first_study():
    """The estimate of the first study's 62 units against the wall seconds they recorded."""
    cfg = load_config_file(ROOT / "recipes" / "compare" / "smollm2_study.yaml")
    units = sweep_units(cfg)
    out = ROOT / cfg.output_dir
    recorded = [json.loads((compare.units.unit_dir(out, u) / "result.json").read_text())["wall_seconds"] for u in units]
    estimate = estimate_seconds(cfg, units)["total"]
    print(f"study 1: estimated {estimate / 3600:.2f} core-hours, recorded {sum(recorded) / 3600:.2f}")
    assert 0.8 < estimate / sum(recorded) < 1.2


def _group(label, kl, gain):
    return {"label": label, "metrics": {"kl_general": {"mean": kl}, "in_domain_gain": {"mean": gain}}}


def test_decision_rule_and_frontier_comparison():
    sft = [_group("sft", 0.1, 0.1), _group("sft", 0.3, 0.3)]
    # SFT's frontier at KL 0.2 is a gain of 0.2 (linear between its two rates)
    assert selection.frontier_above([_group("idft", 0.2, 0.25)], sft) is True
    assert selection.frontier_above([_group("idft", 0.2, 0.25), _group("idft", 0.25, 0.2)], sft) is False
    assert selection.frontier_above([_group("idft", 0.5, 1.0)], sft) is None  # no overlap in KL: no comparison

    def row(in_low, ood_low, ret_low):
        boot = {role: {"mean": low + 0.02, "ci_low": low, "ci_high": low + 0.04, "zero_width": False}
                for role, low in (("in_domain", in_low), ("ood", ood_low), ("retention", ret_low))}
        return [{"a": "idft", "b": "sft", "bootstrap": boot}]

    far = [_group("idft", 0.5, 1.0)]
    assert selection.decision(row(-0.03, 0.01, 0.02), far + sft)["supported"] is True  # (A)
    assert selection.decision(row(-0.08, 0.01, 0.02), far + sft)["supported"] is False  # more than 5 points behind
    assert selection.decision(row(-0.03, -0.01, 0.02), far + sft)["supported"] is False  # OOD not better
    assert selection.decision(row(-0.08, -0.01, 0.02), [_group("idft", 0.2, 0.25)] + sft)["supported"] is True  # (B)
    assert selection.decision([], sft) is None


@pytest.mark.parametrize("section, key, value", [
    ("budget", "adam_beta2", float("nan")), ("budget", "adam_beta2", 1.0), ("budget", "adam_beta2", -0.1),
    ("budget", "warmup_ratio", float("inf")), ("budget", "warmup_ratio", -0.1), ("budget", "warmup_ratio", 1.0),
    ("data", "dev_n", 0), ("data", "dev_n", float("nan")), ("data", "prompt_template", "no placeholder"),
])
def test_new_study2_fields_refuse_non_finite_and_out_of_range_values(tmp_path, tiny_model_dir, section, key, value):
    raw = yaml.safe_load((ROOT / "recipes" / "compare" / "smollm2_study2.yaml").read_text())
    raw["model_name_or_path"], raw["output_dir"] = str(tiny_model_dir), str(tmp_path / "out")
    raw[section][key] = value
    with pytest.raises(ValueError, match=rf"^{section}\.{key}=.* is invalid"):
        parse_config(raw)
