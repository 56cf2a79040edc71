"""Bad input, as a hostile user would give it, to every command: each case must end with a non-zero exit status, one
`trl-onpolicy CMD: error: ...` line naming the field or file, no traceback, the inputs unchanged and no model
written. The commands run in-process (`trl_onpolicy.cli.commands.main`) with a tiny model, so the table stays fast.
An error once a command's work has started is the other case: a failure, with its traceback and exit status 1."""

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
# (case id, argv builder, text the error must contain: one string, or a tuple of strings that must all appear)
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
    ("train-epochs-0", lambda w: _train(w, "--max_steps", "-1", "--num_train_epochs", "0"), ("num_train_epochs=0.0 is invalid", "nothing would be trained")),
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
    ("train-missing-model", lambda w: _train(w, "--model_name_or_path", str(w["root"] / "no/such/model")), ("model_name_or_path=", "no such local folder")),
    ("train-model-no-weights", lambda w: _train(w, "--model_name_or_path", str(w["no_weights"])), ("model_name_or_path=", "no weight files")),
    ("train-output-is-model", lambda w: _train(w, "--output_dir", str(w["model"])), ("output_dir '", "would overwrite the input")),
    ("train-output-is-file", lambda w: _train(w, "--output_dir", str(w["a_file"])), ("output_dir '", "is an existing file")),
    ("train-output-under-file", lambda w: _train(w, "--output_dir", str(w["a_file"] / "sub")), ("output_dir '", "a_file is a file")),
    ("train-partial-checkpoint", lambda w: _train(w, "--resume_from_checkpoint", str(w["partial_checkpoint"])), ("resume_from_checkpoint=", "is incomplete")),
    ("eval-missing-model", lambda w: _eval(w, "--model_name_or_path", "./no/such/model"), ("model_name_or_path=", "no such local folder")),
    ("ddt-output-is-model", lambda w: _ddt(w, "--output_dir", str(w["model"])), ("ddt output_dir", "would overwrite the input")),
    ("filter-output-is-input", lambda w: _filter(w, "--output_path", str(w["sft"])), ("ddt-filter output_path", "would overwrite the input")),
    ("filter-wrong-scores", lambda w: _filter(w, "--scores_file", str(w["sft"])), ("scores_file '", "no integer `index`")),
    ("filter-summary-as-scores", lambda w: _filter(w, "--scores_file", str(w["summary"])), ("scores_file '", "samples.jsonl")),
    ("realign-output-is-data", lambda w: _realign(w, "--output_dir", str(w["realign"])), ("RealignConfig.output_dir", "is an existing file")),
    ("pairs-output-is-model", lambda w: _pairs(w, "--output_dir", str(w["model"])), ("pairs output_dir", "would overwrite the input")),
    # recipes
    ("recipe-python-tag", lambda w: _train(w, "--config", str(w["python_tag"])), ("python_tag.yaml", "Python tags")),
    ("recipe-list", lambda w: _train(w, "--config", str(w["list_yaml"])), ("list.yaml", "must be a YAML mapping")),
    ("recipe-no-path", lambda w: ["ddt", "--config"], "`--config` needs the path"),
    ("recipe-missing", lambda w: ["realign", "--config", str(w["root"] / "nope.yaml")], "nope.yaml' does not exist"),
    ("recipe-python-tag-realign", lambda w: ["realign", "--config", str(w["python_tag"])], ("python_tag.yaml", "Python tags")),
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
    ("realign-placeholder", lambda w: _realign(w, "--hint_template", "{question} {reference} {answer}"), ("hint_template", "unknown placeholder")),
    ("realign-temperature-nan", lambda w: _realign(w, "--temperature", NAN), "temperature=nan"),
    ("realign-top-p", lambda w: _realign(w, "--top_p", "1.5"), "top_p=1.5"),
    ("quickstart-lr-nan", lambda w: _quickstart(w, "--learning_rate", NAN), "learning_rate=nan"),
    ("quickstart-missing-model", lambda w: _quickstart(w, "--model_name_or_path", "./no/such/model"), ("model_name_or_path=", "no such local folder")),
    ("realign-model-no-weights", lambda w: _realign(w, "--model_name_or_path", str(w["no_weights"])), ("model_name_or_path=", "no weight files")),
    ("quickstart-steps-0", lambda w: _quickstart(w, "--max_steps", "0"), "max_steps=0"),
    # ddt with no row it can score: one line before the cache is opened (was an empty summary, then a plot error)
    ("ddt-no-row-fits-max-length", lambda w: _ddt(w, "--max_length", "8"), "none of the 8 rows can be scored (too_long: 8"),
    ("ddt-all-completions-empty", lambda w: _ddt(w, data="all_empty"), "none of the 3 rows can be scored (empty_completion: 3"),
    # an output folder equal to the model folder, for the commands the rows above do not cover
    ("dpo-output-is-model", lambda w: _pref("dpo", w, "--output_dir", str(w["model"])), ("output_dir '", "would overwrite the input")),
    ("simpo-output-is-model", lambda w: _pref("simpo", w, "--output_dir", str(w["model"])), ("output_dir '", "would overwrite the input")),
    ("realign-output-is-model", lambda w: _realign(w, "--output_dir", str(w["model"])), ("RealignConfig.output_dir", "would overwrite the input")),
    ("eval-output-is-model", lambda w: _eval(w, "--output_dir", str(w["model"])), ("eval output_dir", "would overwrite the input")),
    ("quickstart-output-is-model", lambda w: _quickstart(w, "--output_dir", str(w["model"])), ("quickstart output_dir", "would overwrite the input")),
    ("compare-config-no-path", lambda w: ["compare", "--config"], "`--config` needs the path"),
    ("filter-scores-of-other-data", lambda w: _filter(w, "--scores_file", str(w["other_scores"])), ("scores_file '", "scores different data than this dataset")),
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
    name, build, needles = case
    argv = build(world)
    before = _snapshot(world["root"]), _snapshot(world["model"])
    try:
        rc = cli.main(argv)
    except SystemExit as e:  # argparse's own refusals (not expected here, but still a non-zero exit)
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2, (name, rc, err)
    assert f"trl-onpolicy {argv[0]}: error:" in err, err
    for needle in _needles(needles):
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


def _needles(needles) -> tuple:
    return (needles,) if isinstance(needles, str) else tuple(needles)


# the arguments each command's rows start from; a row's own changes to them are what it tests
BASE_ARGV = {"train": _train, "dpo": lambda w: _pref("dpo", w), "simpo": lambda w: _pref("simpo", w), "ddt": _ddt,
             "ddt-filter": _filter, "eval": _eval, "pairs": _pairs, "realign": _realign, "quickstart": _quickstart}


def _flags(argv: list[str]) -> dict:
    """``--name value`` / ``--name`` pairs of a command line (the command itself left out)."""
    flags, i = {}, 1
    while i < len(argv):
        if argv[i].startswith("--"):
            has_value = i + 1 < len(argv) and not argv[i + 1].startswith("--")
            flags[argv[i][2:]] = argv[i + 1] if has_value else None
            i += 2 if has_value else 1
        else:
            i += 1
    return flags


def _names_of_what_changed(argv: list[str], world) -> set[str]:
    """What an error about this row may name to point at the bad input: each flag the row changes from its command's
    base arguments, the file name of a changed path value, and the keys inside a changed recipe or data file."""
    base = _flags(BASE_ARGV[argv[0]](world)) if argv[0] in BASE_ARGV else {}
    names = set()
    for flag, value in _flags(argv).items():
        if flag in base and base[flag] == value:
            continue
        names.add(flag)
        if value is None:
            continue
        path = Path(value.split("=", 1)[-1])
        names.add(path.name)
        if path.is_file() and path.suffix in (".yaml", ".jsonl", ".json"):
            import yaml

            try:
                first = yaml.safe_load(path.read_text().splitlines()[0]) if path.suffix == ".jsonl" else yaml.safe_load(path.read_text())
            except (yaml.YAMLError, IndexError, UnicodeDecodeError):
                continue
            if isinstance(first, dict):
                names.update(first)
    return names


def test_bad_input_rows_cover_every_command_and_name_the_field(world):
    """The table covers what it claims: every command has rows (at least two each), and each row's expected message
    names what the row made bad (the flag, the file or the key/column inside it), not only a symptom."""
    assert len({c[0] for c in CASES}) == len(CASES), "duplicate case ids"
    commands = [build(world)[0] for _, build, _ in CASES]
    assert set(commands) <= set(cli.COMMANDS)
    thin = {name: commands.count(name) for name in cli.COMMANDS if commands.count(name) < 2}
    assert not thin, f"commands with fewer than two bad-input rows: {thin}"
    vague = []
    for name, build, needles in CASES:
        names = _names_of_what_changed(build(world), world)
        assert names, f"{name}: the row changes nothing from its command's base arguments"
        if not any(n in needle for needle in _needles(needles) for n in names):
            vague.append((name, sorted(names), needles))
    assert not vague, f"rows whose expected error names none of the fields they change: {vague}"


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


# ------------------------------------------------------------------ an error once the work has started is a failure


def _fail_hours_in(*args, **kwargs):
    raise ValueError("simulated failure hours into the run")


def _compare_recipe(w, tmp_path) -> Path:
    path = tmp_path / "compare.yaml"
    path.write_text(json.dumps({
        "model_name_or_path": str(w["model"]), "output_dir": str(tmp_path / "out-compare"), "methods": ["base"],
        "data": {"task": "chain_sum", "n": 4}, "budget": {"max_steps": 1},
        "eval": {"sets": [{"name": "facts", "task": "facts", "n": 2, "role": "retention"}]}}))
    return path


def _break_the_work(command, monkeypatch):
    """Make the long-running step of ``command`` raise a ValueError, after every input check has passed."""
    if command == "train":
        from trl_onpolicy.trainer.idft_trainer import IDFTTrainer

        monkeypatch.setattr(IDFTTrainer, "train", _fail_hours_in)
    elif command == "eval":
        import trl_onpolicy.cli.eval as eval_cli

        monkeypatch.setattr(eval_cli, "evaluate", _fail_hours_in)
    elif command == "compare":
        from trl_onpolicy.compare.runner import Comparison

        monkeypatch.setattr(Comparison, "_run_claimed", _fail_hours_in)
    elif command == "quickstart":
        from trl_onpolicy.trainer.idft_trainer import IDFTTrainer

        monkeypatch.setattr(IDFTTrainer, "train", _fail_hours_in)
    elif command in ("ddt", "ddt-filter"):
        import trl_onpolicy.cli.ddt as ddt_cli

        monkeypatch.setattr(ddt_cli, "_chunked" if command == "ddt" else "_score", _fail_hours_in)
    elif command == "realign":
        import trl_onpolicy.hinted.realign as realign

        monkeypatch.setattr(realign, "realign_shard", _fail_hours_in)
    elif command == "pairs":
        import trl_onpolicy.eval.preferences as preferences

        monkeypatch.setattr(preferences, "make_preference_dataset", _fail_hours_in)


# (command, a good command line, the same command line with one bad flag, the field its error names)
WORK_CASES = [
    ("train", lambda w, tmp: _train(w, "--output_dir", str(tmp / "o")),
     lambda w, tmp: _train(w, "--output_dir", str(tmp / "o"), "--learning_rate", "nan"), "learning_rate=nan"),
    ("eval", lambda w, tmp: _eval(w, "--output_dir", str(tmp / "o")),
     lambda w, tmp: _eval(w, "--output_dir", str(tmp / "o"), "--top_p", "0"), "top_p=0.0"),
    ("compare", lambda w, tmp: ["compare", "--config", str(_compare_recipe(w, tmp))],
     lambda w, tmp: ["compare", "--config", str(_compare_recipe(w, tmp)), "--budget", "{max_steps: 0}"], "max_steps"),
    ("quickstart", lambda w, tmp: _quickstart(w, "--output_dir", str(tmp / "o"), "--num_samples", "2", "--max_steps", "1"),
     lambda w, tmp: _quickstart(w, "--output_dir", str(tmp / "o"), "--max_steps", "0"), "max_steps=0"),
    ("ddt", lambda w, tmp: _ddt(w, "--output_dir", str(tmp / "o")),
     lambda w, tmp: _ddt(w, "--output_dir", str(tmp / "o"), "--batch_size", "0"), "batch_size=0"),
    ("ddt-filter", lambda w, tmp: ["ddt-filter", "--dataset_name", str(w["sft"]), "--model_name_or_path", str(w["model"]),
                                   "--output_dir", str(tmp / "o"), "--min_value", "-0.3", "--no_progress"],
     lambda w, tmp: _filter(w, "--output_dir", str(tmp / "o"), "--min_value", "nan"), "min_value=nan"),
    ("realign", lambda w, tmp: _realign(w, "--output_dir", str(tmp / "o")),
     lambda w, tmp: _realign(w, "--output_dir", str(tmp / "o"), "--temperature", "nan"), "temperature=nan"),
    ("pairs", lambda w, tmp: ["pairs", "--model_name_or_path", str(w["model"]), "--task", "chain_sum", "--num_prompts", "2",
                              "--output_dir", str(tmp / "o"), "--max_new_tokens", "4", "--num_samples", "2"],
     lambda w, tmp: _pairs(w, "--output_dir", str(tmp / "o"), "--temperature", "nan"), "temperature=nan"),
]


@pytest.mark.parametrize("case", WORK_CASES, ids=[c[0] for c in WORK_CASES])
def test_error_during_the_work_is_a_failure_with_its_traceback(case, world, tmp_path, capsys, monkeypatch):
    """A ValueError raised once the command's work has started (the trainer's ``train``, the evaluation, the sweep,
    the scoring, the generation) is no bad input: exit status 1 and the traceback, not exit 2 and one line. Before
    the work, a bad flag of the same command is still one line and exit 2 (the mark of the failed run does not leak
    into the next one)."""
    monkeypatch.delenv("TRL_ONPOLICY_TRACEBACK", raising=False)
    command, good, bad, field = case
    _break_the_work(command, monkeypatch)
    assert cli.main(good(world, tmp_path)) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "_fail_hours_in" in err, err
    assert f"trl-onpolicy {command}: failed: ValueError: simulated failure hours into the run" in err
    assert f"trl-onpolicy {command}: error:" not in err

    assert cli.main(bad(world, tmp_path)) == 2
    err = capsys.readouterr().err
    assert f"trl-onpolicy {command}: error:" in err and field in err, err
    lines = err.strip().splitlines()  # the error line, and the dispatcher's TRL_ONPOLICY_TRACEBACK hint if it printed it
    assert "Traceback" not in err and lines[0].startswith(f"trl-onpolicy {command}: error:") and len(lines) <= 2, err


def test_interrupt_during_training_still_exits_130(world, tmp_path, capsys, monkeypatch):
    from trl_onpolicy.trainer.idft_trainer import IDFTTrainer

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(IDFTTrainer, "train", interrupted)
    assert cli.main(_train(world, "--output_dir", str(tmp_path / "o"))) == 130
    assert "interrupted" in capsys.readouterr().err


def test_work_mark_is_per_command_and_travels_with_the_error():
    """`command_scope` starts each command unmarked and restores the caller's mark; an error raised after
    `work_started()` stays recognisable once it has left the scope (the launchable scripts' `run_main` sits inside
    the dispatcher's scope)."""
    from trl_onpolicy.utils.errors import command_scope, has_work_started, raised_during_work, work_started

    with command_scope():
        work_started()
        with pytest.raises(ValueError) as inner:
            with command_scope():
                assert not has_work_started()
                work_started()
                raise ValueError("after the mark")
        assert has_work_started()  # the outer command's mark is back
    assert not has_work_started()
    assert raised_during_work(inner.value)
    with pytest.raises(ValueError) as before:
        with command_scope():
            raise ValueError("before the mark")
    assert not raised_during_work(before.value)
