"""Bad input, as a hostile user would give it, to every command: each case must end with a non-zero exit status, one
`trl-onpolicy CMD: error: ...` line naming the field or file, no traceback, the inputs unchanged and no model
written. The commands run in-process (`trl_onpolicy.cli.commands.main`) with a tiny model, so the table stays fast."""

import hashlib
import json
from pathlib import Path

import pytest
from conftest import arithmetic_examples, word_problem_rows

from trl_onpolicy.cli import commands as cli


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_dir):
    """Inputs shared by every case: a model folder, SFT/preference/realign data, a scores file, bad files."""
    root = tmp_path_factory.mktemp("bad-inputs")
    w = {"root": root, "model": Path(tiny_model_dir)}
    w["sft"] = write_jsonl(root / "sft.jsonl", arithmetic_examples(8))
    prefs = [{"prompt": r["prompt"], "chosen": r["completion"], "rejected": [{"role": "assistant", "content": "No."}]}
             for r in arithmetic_examples(4)]
    w["prefs"] = write_jsonl(root / "prefs.jsonl", prefs)
    w["realign"] = write_jsonl(root / "realign.jsonl", word_problem_rows(4))
    rows = arithmetic_examples(4)
    rows[2] = dict(rows[2], completion=[{"role": "assistant", "content": ""}])
    w["empty_completion"] = write_jsonl(root / "empty_completion.jsonl", rows)
    rows = arithmetic_examples(4)
    rows[1] = dict(rows[1], completion=None)
    w["null_completion"] = write_jsonl(root / "null_completion.jsonl", rows)
    w["all_empty"] = write_jsonl(root / "all_empty.jsonl", [dict(r, completion=[{"role": "assistant", "content": ""}])
                                                            for r in arithmetic_examples(3)])
    prefs_bad = [dict(p) for p in prefs]
    prefs_bad[0]["rejected"] = ""
    w["empty_rejected"] = write_jsonl(root / "empty_rejected.jsonl", prefs_bad)
    (root / "empty.jsonl").write_text("\n\n")
    w["empty"] = root / "empty.jsonl"
    lines = [json.dumps(r).encode() for r in arithmetic_examples(3)]
    lines[1] = lines[1].replace(b"What", b"Wh\xff\xfeat")
    (root / "latin1.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    w["latin1"] = root / "latin1.jsonl"
    w["no_weights"] = root / "no_weights"
    w["no_weights"].mkdir()
    (w["no_weights"] / "config.json").write_text((w["model"] / "config.json").read_text())
    (root / "a_file").write_text("not a folder")
    w["a_file"] = root / "a_file"
    (root / "python_tag.yaml").write_text("model_name_or_path: !!python/object/apply:os.system ['echo pwned']\n")
    (root / "list.yaml").write_text("- model_name_or_path: x\n- dataset_name: y\n")
    w["python_tag"], w["list_yaml"] = root / "python_tag.yaml", root / "list.yaml"
    (root / "compare_hub.yaml").write_text(json.dumps({  # JSON is YAML: a compare recipe whose model is an unknown Hub id
        "model_name_or_path": HUB_ID, "output_dir": str(root / "out-compare"), "methods": ["base"],
        "data": {"task": "chain_sum", "n": 4}, "budget": {"max_steps": 1},
        "eval": {"sets": [{"name": "facts", "task": "facts", "n": 2, "role": "retention"}]}}))
    w["compare_hub"] = root / "compare_hub.yaml"
    w["summary"] = root / "summary.json"
    w["summary"].write_text(json.dumps({"mean_phi": 0.1}) + "\n")
    w["scores"] = write_jsonl(root / "samples.jsonl", [{"index": i, "mean_phi": -0.1 * i} for i in range(8)])
    (root / "scored-other").mkdir()  # a ddt output made from other data: its summary's data fingerprint differs
    w["other_scores"] = write_jsonl(root / "scored-other" / "samples.jsonl", [{"index": i, "mean_phi": -0.1} for i in range(8)])
    (root / "scored-other" / "summary.json").write_text(json.dumps({"fingerprint": {"data": "not-this-data"}}))
    ckpt = root / "partial-checkpoint"
    ckpt.mkdir()
    (ckpt / "model.safetensors").write_bytes(b"\0" * 10)
    w["partial_checkpoint"] = ckpt
    return w


def _train(w, *extra, data="sft"):
    return ["train", "--model_name_or_path", str(w["model"]), "--dataset_name", str(w[data]), "--output_dir",
            str(w["root"] / "out-train"), "--max_steps", "1", "--per_device_train_batch_size", "2", "--max_length", "64",
            "--report_to", "none", *extra]


def _pref(cmd, w, *extra, data="prefs"):
    return [cmd, "--model_name_or_path", str(w["model"]), "--dataset_name", str(w[data]), "--output_dir",
            str(w["root"] / f"out-{cmd}"), "--max_steps", "1", "--per_device_train_batch_size", "2", "--max_length", "64",
            "--report_to", "none", *extra]


def _ddt(w, *extra, data="sft"):
    return ["ddt", "--model_name_or_path", str(w["model"]), "--dataset_name", str(w[data]), "--output_dir",
            str(w["root"] / "out-ddt"), "--no_progress", *extra]


def _filter(w, *extra):
    return ["ddt-filter", "--dataset_name", str(w["sft"]), "--scores_file", str(w["scores"]), "--output_dir",
            str(w["root"] / "out-filter"), "--min_value", "-0.3", *extra]


def _eval(w, *extra):
    return ["eval", "--model_name_or_path", str(w["model"]), "--sets", "facts=facts:2", "--output_dir",
            str(w["root"] / "out-eval"), "--max_new_tokens", "4", "--progress", "false", *extra]


def _pairs(w, *extra):
    return ["pairs", "--model_name_or_path", str(w["model"]), "--dataset_name", str(w["sft"]), "--output_dir",
            str(w["root"] / "out-pairs"), "--max_new_tokens", "4", *extra]


def _realign(w, *extra):
    return ["realign", "--model_name_or_path", str(w["model"]), "--dataset_name", str(w["realign"]), "--output_dir",
            str(w["root"] / "out-realign"), "--max_new_tokens", "4", "--checker", "none", *extra]


def _quickstart(w, *extra):
    return ["quickstart", "--model_name_or_path", str(w["model"]), "--output_dir", str(w["root"] / "out-qs"), *extra]


NAN, INF = "nan", "inf"
HUB_ID = "trl-onpolicy-tests/no-such-model"  # looks like a Hub id (owner/name); the Hub (offline in tests) lacks it
# (case id, argv builder, text the error must contain)
CASES = [
    # TRL / transformers fields our training commands pass on
    ("train-lr-inf", lambda w: _train(w, "--learning_rate", INF), "learning_rate=inf"),
    # a negative number in exponent notation, space-separated (argparse alone would read it as an option)
    ("train-lr-negative-exp", lambda w: _train(w, "--learning_rate", "-1e-5"), "learning_rate=-1e-05"),
    ("train-wd-nan", lambda w: _train(w, "--weight_decay", NAN), "weight_decay=nan"),
    ("train-grad-norm-neg", lambda w: _train(w, "--max_grad_norm", "-1"), "max_grad_norm=-1"),
    ("train-adam-beta1", lambda w: _train(w, "--adam_beta1", "1.5"), "adam_beta1=1.5"),
    ("train-adam-eps-nan", lambda w: _train(w, "--adam_epsilon", NAN), "adam_epsilon=nan"),
    ("train-grad-accum-0", lambda w: _train(w, "--gradient_accumulation_steps", "0"), "gradient_accumulation_steps=0"),
    ("train-no-steps", lambda w: _train(w, "--max_steps", "-1", "--num_train_epochs", "-1"), "num_train_epochs=-1"),
    ("train-epochs-0", lambda w: _train(w, "--max_steps", "-1", "--num_train_epochs", "0"), "nothing would be trained"),
    ("train-batch-0", lambda w: _train(w, "--per_device_train_batch_size", "0"), "per_device_train_batch_size=0"),
    ("train-max-length-0", lambda w: _train(w, "--max_length", "0"), "max_length=0"),
    ("train-eaft-top-k-1", lambda w: _train(w, "--token_loss", "eaft", "--eaft_top_k", "1"), "eaft_top_k=1"),
    ("train-idft-beta-nan", lambda w: _train(w, "--idft_beta", NAN), "idft_beta=nan"),
    ("train-warmup-ratio", lambda w: _train(w, "--idft_warmup_ratio", "1.5"), "idft_warmup_ratio=1.5"),
    ("dpo-beta-nan", lambda w: _pref("dpo", w, "--beta", NAN), "beta=nan"),
    ("dpo-label-smoothing", lambda w: _pref("dpo", w, "--label_smoothing", "0.9"), "label_smoothing=0.9"),
    ("simpo-beta-neg", lambda w: _pref("simpo", w, "--beta", "-2"), "SimPOConfig.beta=-2"),
    ("simpo-gamma-inf", lambda w: _pref("simpo", w, "--simpo_gamma", INF), "simpo_gamma=inf"),
    # data
    ("train-empty-completion", lambda w: _train(w, data="empty_completion"), "empty or null `completion` (rows 2)"),
    ("train-null-completion", lambda w: _train(w, data="null_completion"), "empty or null `completion` (rows 1)"),
    ("dpo-empty-rejected", lambda w: _pref("dpo", w, data="empty_rejected"), "empty or null `rejected`"),
    ("train-prompts-beyond-max-length", lambda w: _train(w, "--max_length", "8"), "longer than max_length=8"),
    ("train-empty-jsonl", lambda w: _train(w, data="empty"), "empty.jsonl' is empty"),
    ("train-non-utf8", lambda w: _train(w, data="latin1"), "latin1.jsonl', line 2: not valid UTF-8"),
    ("ddt-non-utf8", lambda w: _ddt(w, data="latin1"), "latin1.jsonl', line 2: not valid UTF-8"),
    ("ddt-empty-jsonl", lambda w: _ddt(w, data="empty"), "empty.jsonl' is empty"),
    # models and output paths
    ("train-missing-model", lambda w: _train(w, "--model_name_or_path", str(w["root"] / "no/such/model")), "no such local folder"),
    ("train-model-no-weights", lambda w: _train(w, "--model_name_or_path", str(w["no_weights"])), "no weight files"),
    ("train-output-is-model", lambda w: _train(w, "--output_dir", str(w["model"])), "would overwrite the input"),
    ("train-output-is-file", lambda w: _train(w, "--output_dir", str(w["a_file"])), "is an existing file"),
    ("train-output-under-file", lambda w: _train(w, "--output_dir", str(w["a_file"] / "sub")), "a_file is a file"),
    ("train-partial-checkpoint", lambda w: _train(w, "--resume_from_checkpoint", str(w["partial_checkpoint"])), "is incomplete"),
    ("eval-missing-model", lambda w: _eval(w, "--model_name_or_path", "./no/such/model"), "no such local folder"),
    ("ddt-output-is-model", lambda w: _ddt(w, "--output_dir", str(w["model"])), "would overwrite the input"),
    ("filter-output-is-input", lambda w: _filter(w, "--output_path", str(w["sft"])), "would overwrite the input"),
    ("filter-wrong-scores", lambda w: _filter(w, "--scores_file", str(w["sft"])), "no integer `index`"),
    ("filter-summary-as-scores", lambda w: _filter(w, "--scores_file", str(w["summary"])), "samples.jsonl"),
    ("realign-output-is-data", lambda w: _realign(w, "--output_dir", str(w["realign"])), "is an existing file"),
    ("pairs-output-is-model", lambda w: _pairs(w, "--output_dir", str(w["model"])), "would overwrite the input"),
    # recipes
    ("recipe-python-tag", lambda w: _train(w, "--config", str(w["python_tag"])), "Python tags"),
    ("recipe-list", lambda w: _train(w, "--config", str(w["list_yaml"])), "must be a YAML mapping"),
    ("recipe-no-path", lambda w: ["ddt", "--config"], "`--config` needs the path"),
    ("recipe-missing", lambda w: ["realign", "--config", str(w["root"] / "nope.yaml")], "nope.yaml' does not exist"),
    ("recipe-python-tag-realign", lambda w: ["realign", "--config", str(w["python_tag"])], "Python tags"),
    # sampling and other numeric arguments of the data commands
    ("ddt-self-temperature-nan", lambda w: _ddt(w, "--self_temperature", NAN), "self_temperature=nan"),
    ("ddt-batch-0", lambda w: _ddt(w, "--batch_size", "0"), "batch_size=0"),
    ("filter-min-nan", lambda w: _filter(w, "--min_value", NAN), "min_value=nan"),
    ("filter-min-above-max", lambda w: _filter(w, "--max_value", "-1"), "exceeds max_value"),
    ("eval-temperature-nan", lambda w: _eval(w, "--temperature", NAN), "temperature=nan"),
    ("eval-top-p-0", lambda w: _eval(w, "--top_p", "0"), "top_p=0.0"),
    ("eval-missing-set-file", lambda w: _eval(w, "--sets", f"x={w['root'] / 'missing.jsonl'}"), "missing.jsonl' does not exist"),
    ("pairs-temperature-nan", lambda w: _pairs(w, "--temperature", NAN), "temperature=nan"),
    ("pairs-num-samples-0", lambda w: _pairs(w, "--num_samples", "0"), "num_samples=0"),
    ("realign-placeholder", lambda w: _realign(w, "--hint_template", "{question} {reference} {answer}"), "unknown placeholder"),
    ("realign-temperature-nan", lambda w: _realign(w, "--temperature", NAN), "temperature=nan"),
    ("realign-top-p", lambda w: _realign(w, "--top_p", "1.5"), "top_p=1.5"),
    ("quickstart-lr-nan", lambda w: _quickstart(w, "--learning_rate", NAN), "learning_rate=nan"),
    ("quickstart-missing-model", lambda w: _quickstart(w, "--model_name_or_path", "./no/such/model"), "no such local folder"),
    ("realign-model-no-weights", lambda w: _realign(w, "--model_name_or_path", str(w["no_weights"])), "no weight files"),
    ("quickstart-steps-0", lambda w: _quickstart(w, "--max_steps", "0"), "max_steps=0"),
    # ddt with no row it can score: one line before the cache is opened (was an empty summary, then a plot error)
    ("ddt-no-row-fits-max-length", lambda w: _ddt(w, "--max_length", "8"), "none of the 8 rows can be scored (too_long: 8"),
    ("ddt-all-completions-empty", lambda w: _ddt(w, data="all_empty"), "none of the 3 rows can be scored (empty_completion: 3"),
    # an output folder equal to the model folder, for the commands the rows above do not cover
    ("dpo-output-is-model", lambda w: _pref("dpo", w, "--output_dir", str(w["model"])), "would overwrite the input"),
    ("simpo-output-is-model", lambda w: _pref("simpo", w, "--output_dir", str(w["model"])), "would overwrite the input"),
    ("realign-output-is-model", lambda w: _realign(w, "--output_dir", str(w["model"])), "would overwrite the input"),
    ("eval-output-is-model", lambda w: _eval(w, "--output_dir", str(w["model"])), "would overwrite the input"),
    ("quickstart-output-is-model", lambda w: _quickstart(w, "--output_dir", str(w["model"])), "would overwrite the input"),
    ("compare-config-no-path", lambda w: ["compare", "--config"], "`--config` needs the path"),
    ("filter-scores-of-other-data", lambda w: _filter(w, "--scores_file", str(w["other_scores"])), "scores different data than this dataset"),
    ("quickstart-prompts-beyond-max-length", lambda w: _quickstart(w, "--max_length", "8", "--num_samples", "4"),
     "every one of the 4 training rows is longer than max_length=8"),
    # a model named like a Hub id that the Hub (or its offline cache) cannot provide: one line, not a traceback
    ("train-unknown-hub-id", lambda w: _train(w, "--model_name_or_path", HUB_ID), f"model_name_or_path={HUB_ID!r} is not a local folder"),
    ("ddt-unknown-hub-id", lambda w: _ddt(w, "--model_name_or_path", HUB_ID), f"model_name_or_path={HUB_ID!r} is not a local folder"),
    ("eval-unknown-hub-id", lambda w: _eval(w, "--model_name_or_path", HUB_ID), f"model_name_or_path={HUB_ID!r} is not a local folder"),
    ("quickstart-unknown-hub-id", lambda w: _quickstart(w, "--model_name_or_path", HUB_ID), f"model_name_or_path={HUB_ID!r} is not a local folder"),
    ("compare-unknown-hub-id", lambda w: ["compare", "--config", str(w["compare_hub"])], f"model_name_or_path={HUB_ID!r} is not a local folder"),
]


def _snapshot(root: Path) -> dict:
    """Every file under ``root`` with its content hash (inputs and outputs alike)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_error_line_before_any_work(case, world, capsys, monkeypatch):
    monkeypatch.delenv("TRL_ONPOLICY_TRACEBACK", raising=False)
    name, build, needle = case
    argv = build(world)
    before = _snapshot(world["root"]), _snapshot(world["model"])
    try:
        rc = cli.main(argv)
    except SystemExit as e:  # argparse's own refusals (not expected here, but still a non-zero exit)
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2, (name, rc, err)
    assert f"trl-onpolicy {argv[0]}: error:" in err, err
    assert needle in err, (needle, err)
    assert "Traceback" not in err
    # nothing changed: inputs untouched, no model (nor anything else) written
    assert (_snapshot(world["root"]), _snapshot(world["model"])) == before


def test_launchable_script_reads_a_negative_exponent_value(world, capsys):
    """`accelerate launch scripts/train.py ...` does not come through `trl-onpolicy`: its own parser must still read
    ``--learning_rate -1e-5`` as a value and refuse it by name."""
    from trl_onpolicy.cli import train

    before = _snapshot(world["root"])
    assert train.main(_train(world, "--learning_rate", "-1e-5")[1:]) == 2
    assert "learning_rate=-1e-05 is invalid" in capsys.readouterr().err
    assert _snapshot(world["root"]) == before  # nothing written


def test_enough_bad_inputs_are_covered():
    assert len(CASES) >= 30


def test_traceback_on_request_and_same_message_from_the_api(world, monkeypatch):
    """TRL_ONPOLICY_TRACEBACK=1 re-raises; the Python API raises the same ValueError the CLI prints."""
    from trl_onpolicy.eval.evaluation import EvalConfig

    monkeypatch.setenv("TRL_ONPOLICY_TRACEBACK", "1")
    with pytest.raises(ValueError, match="temperature=nan"):
        cli.main(_eval(world, "--temperature", "nan"))
    with pytest.raises(ValueError, match=r"EvalConfig.temperature=nan is invalid: expected a finite number >= 0"):
        EvalConfig(temperature=float("nan"))


def test_sigint_exits_130_after_keeping_finished_work(world, capsys, monkeypatch):
    """Ctrl-C in any command: exit status 130 and a note that the same command resumes (one handler in cli.py)."""
    import trl_onpolicy.cli.ddt as ddt_cli

    monkeypatch.delenv("TRL_ONPOLICY_TRACEBACK", raising=False)

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ddt_cli, "run_ddt", interrupted)
    assert cli.main(_ddt(world)) == 130
    assert "interrupted" in capsys.readouterr().err


def test_train_resumes_from_the_last_complete_checkpoint(world, tmp_path, capsys):
    """A run killed while writing its last checkpoint: the resumed run skips it and continues from the one before."""
    out = tmp_path / "run"
    argv = _train(world, "--output_dir", str(out), "--max_steps", "2", "--save_steps", "1", "--learning_rate", "1e-3")
    assert cli.main(argv) == 0
    assert (out / "checkpoint-1" / "trainer_state.json").is_file() and (out / "checkpoint-2").is_dir()
    (out / "checkpoint-2" / "trainer_state.json").unlink()  # written last: its absence marks a cut-short save
    capsys.readouterr()
    assert cli.main(_train(world, "--output_dir", str(out), "--max_steps", "3", "--save_steps", "1",
                           "--learning_rate", "1e-3", "--resume_from_checkpoint", "true")) == 0
    printed = capsys.readouterr().out
    assert f"{out / 'checkpoint-2'} is incomplete" in printed
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    # resumed at step 1: the log holds steps 2 and 3 of the resumed run (step 1's entry comes from checkpoint-1)
    assert [h["step"] for h in state["log_history"] if "loss" in h] == [1, 2, 3][: len([h for h in state["log_history"] if "loss" in h])]


def test_rows_beyond_max_length_are_counted(capsys):
    """Rows TRL dropped (a prompt filling max_length) are counted and reported; none left is an error."""
    from types import SimpleNamespace

    from trl_onpolicy.cli.recipe import RecipeError, report_dropped_rows

    def trainer(kept):
        return SimpleNamespace(train_dataset=list(range(kept)), args=SimpleNamespace(packing=False, max_length=8),
                               accelerator=SimpleNamespace(print=print))

    report_dropped_rows(trainer(3), list(range(5)))
    assert "2 of 5 training rows have a prompt of max_length=8 tokens or more" in capsys.readouterr().out
    report_dropped_rows(trainer(5), list(range(5)))
    assert capsys.readouterr().out == ""
    with pytest.raises(RecipeError, match="every one of the 5 training rows"):
        report_dropped_rows(trainer(0), list(range(5)))
