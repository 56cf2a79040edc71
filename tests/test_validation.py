"""Unit tests of the shared input checks (`trl_onpolicy.utils.validation`) and result fingerprints (`trl_onpolicy.utils.fingerprint`)."""

import hashlib
import json
import math
import os

import pytest
import torch
from datasets import Dataset

from trl_onpolicy.utils import fingerprint as fp
from trl_onpolicy.utils.validation import (
    COUNT,
    PROBABILITY_OPEN_LOW,
    Range,
    check_choice,
    check_fields,
    check_input_path,
    check_model_source,
    check_nonempty_column,
    check_output_path,
    check_text_file,
    check_training_arguments,
    check_value,
    looks_like_local_path,
)

# ----------------------------------------------------------------------------------------------------------- Range


@pytest.mark.parametrize(
    "rule, good, bad",
    [
        (Range(), [0, -3.5, 1e300], [math.nan, math.inf, -math.inf, "1", None, True]),
        (Range(lo=0, lo_open=True), [1e-12, 3], [0, -1, 0.0]),
        (Range(lo=0, hi=1), [0, 0.5, 1], [-1e-9, 1.0000001]),
        (PROBABILITY_OPEN_LOW, [1e-9, 1], [0, 1.5]),
        (COUNT, [1, 7, 3.0], [0, -1, 2.5, False]),
        (Range(lo=1, integer=True, optional=True), [None, 4], [0]),
        (Range(lo=0, allow_inf=True), [math.inf], [math.nan, -math.inf]),
        (Range(lo=1, integer=True, also=(-1,)), [-1, 5], [0, -2, -1.0]),
    ],
)
def test_range_accepts_exactly_its_values(rule, good, bad):
    for v in good:
        assert rule.accepts(v), (rule, v)
    for v in bad:
        assert not rule.accepts(v), (rule, v)


def test_messages_name_owner_field_value_and_range():
    with pytest.raises(ValueError, match=r"^Cfg\.top_p=nan is invalid: expected a finite number in \(0, 1\]\.$"):
        check_value("top_p", math.nan, PROBABILITY_OPEN_LOW, "Cfg")
    with pytest.raises(ValueError, match=r"^n=0 is invalid: expected an integer >= 1\.$"):
        check_value("n", 0, COUNT)
    with pytest.raises(ValueError, match=r"mode='x' is invalid: choose one of \['a', 'b'\]"):
        check_choice("mode", "x", ["a", "b"])


def test_check_fields_reads_objects_and_mappings_and_skips_absent_fields():
    class Cfg:
        temperature = 0.5
        top_p = 2.0

    rules = {"temperature": Range(lo=0), "top_p": PROBABILITY_OPEN_LOW, "not_there": COUNT}
    with pytest.raises(ValueError, match=r"^Cfg\.top_p=2\.0"):
        check_fields(Cfg(), rules)
    check_fields({"temperature": 1.0}, rules, owner="m")  # absent keys skipped
    with pytest.raises(ValueError, match=r"^m\.temperature=-1"):
        check_fields({"temperature": -1}, rules, owner="m")


def test_training_arguments_table_and_cross_field_rule():
    from types import SimpleNamespace

    ok = SimpleNamespace(learning_rate=1e-5, max_steps=-1, num_train_epochs=1.0, gradient_accumulation_steps=1, beta=0.1)
    check_training_arguments(ok, "X")
    for field, value in [("learning_rate", math.inf), ("gradient_accumulation_steps", 0), ("beta", 0.0), ("beta", -2.0)]:
        with pytest.raises(ValueError, match=rf"^X\.{field}="):
            check_training_arguments(SimpleNamespace(**{**vars(ok), field: value}), "X")
    with pytest.raises(ValueError, match="nothing would be trained"):
        check_training_arguments(SimpleNamespace(**{**vars(ok), "num_train_epochs": 0.0}), "X")
    check_training_arguments(SimpleNamespace(**{**vars(ok), "num_train_epochs": 0.0, "max_steps": 3}), "X")


# ---------------------------------------------------------------------------------------------------------- paths


def test_looks_like_local_path():
    assert looks_like_local_path("./m") and looks_like_local_path("/x/y") and looks_like_local_path("~/m")
    assert looks_like_local_path("a/b/c")
    assert not looks_like_local_path("Qwen/Qwen2.5-Math-7B") and not looks_like_local_path("embedded:smollm2-135m-instruct")


def test_input_path_checks(tmp_path):
    (tmp_path / "f.txt").write_text("x")
    assert check_input_path(tmp_path / "f.txt", "data") == (tmp_path / "f.txt").resolve()
    with pytest.raises(FileNotFoundError, match=r"data '.*nope' does not exist"):
        check_input_path(tmp_path / "nope", "data")
    with pytest.raises(ValueError, match="is a file; expected a folder"):
        check_input_path(tmp_path / "f.txt", "model", must_be_dir=True)
    with pytest.raises(ValueError, match="is a folder; expected a file"):
        check_input_path(tmp_path, "data", must_be_dir=False)


def test_output_path_checks_leave_nothing_behind(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("{}\n")
    model = tmp_path / "model"
    model.mkdir()
    before = sorted(os.listdir(tmp_path))
    check_output_path(tmp_path / "new" / "deeper", "out", inputs=[data, model])
    with pytest.raises(ValueError, match="would overwrite the input"):
        check_output_path(data, "out", inputs=[data], is_dir=False)
    with pytest.raises(ValueError, match="would overwrite the input"):
        check_output_path(model, "out", inputs=[model])
    with pytest.raises(ValueError, match="would overwrite the input"):
        check_output_path(model / "inside", "out", inputs=[model])
    with pytest.raises(ValueError, match="existing file"):
        check_output_path(data, "out")
    with pytest.raises(ValueError, match="existing folder"):
        check_output_path(model, "out", is_dir=False)
    with pytest.raises(ValueError, match="is a file"):
        check_output_path(data / "sub", "out")
    with pytest.raises(ValueError, match="is empty"):
        check_output_path("", "out")
    assert sorted(os.listdir(tmp_path)) == before  # no probe file, no folder created


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_output_path_not_writable(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(ValueError, match="is not writable"):
            check_output_path(ro / "out", "out")
    finally:
        ro.chmod(0o700)


def test_model_source_checks(tmp_path, tiny_model_dir):
    check_model_source(str(tiny_model_dir))
    check_model_source("Qwen/Qwen2.5-Math-7B")  # a Hub id: not checked here
    with pytest.raises(FileNotFoundError, match="no such local folder"):
        check_model_source(str(tmp_path / "missing"))
    (tmp_path / "cfg_only").mkdir()
    (tmp_path / "cfg_only" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no weight files"):
        check_model_source(str(tmp_path / "cfg_only"))
    (tmp_path / "nothing").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        check_model_source(str(tmp_path / "nothing"))


# ----------------------------------------------------------------------------------------------------------- data


def test_text_file_checks(tmp_path):
    good = tmp_path / "g.jsonl"
    good.write_text('{"a": "é \\\\boxed{1}"}\n')
    check_text_file(good)
    bad = tmp_path / "b.jsonl"
    bad.write_bytes(b'{"a": 1}\n{"a": 2}\n{"a": "\xe9"}\n')
    with pytest.raises(ValueError, match=r"b\.jsonl', line 3: not valid UTF-8"):
        check_text_file(bad)
    empty = tmp_path / "e.jsonl"
    empty.write_text(" \n\n")
    with pytest.raises(ValueError, match="is empty"):
        check_text_file(empty)


def test_nonempty_column_counts_and_names_rows():
    rows = [
        {"completion": [{"role": "assistant", "content": "x = 1, so \\boxed{1}"}]},
        {"completion": [{"role": "assistant", "content": "  "}]},
        {"completion": None},
        {"completion": ""},
        {"completion": []},
        {"completion": "fine"},
    ]
    with pytest.raises(ValueError, match=r"4 of 6 rows have an empty or null `completion` \(rows 1, 2, 3, 4\)"):
        check_nonempty_column(rows, "completion", "d")
    messages = Dataset.from_list([{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]}])
    with pytest.raises(ValueError, match="empty or null `messages`"):
        check_nonempty_column(messages, "messages")


# ---------------------------------------------------------------------------------------------------- fingerprint


def test_settings_fingerprint_is_order_free_and_sensitive():
    a = fp.settings_fingerprint({"t": 0.3, "k": [1, 2], "n": None})
    assert a == fp.settings_fingerprint({"n": None, "k": [1, 2], "t": 0.3})
    assert a != fp.settings_fingerprint({"t": 0.30001, "k": [1, 2], "n": None})
    assert fp.settings_fingerprint({"x": math.nan}) == fp.settings_fingerprint({"x": float("nan")})


def test_data_fingerprint_hashes_content_not_paths(tmp_path):
    rows = [{"prompt": "1+1?", "completion": "\\boxed{2}"}, {"prompt": "2+2?", "completion": "\\boxed{4}"}]
    f1, f2 = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    for f in (f1, f2):
        f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert fp.data_fingerprint(f1) == fp.data_fingerprint(f2)
    f2.write_text(f2.read_text().replace("4}", "5}"))
    assert fp.data_fingerprint(f1) != fp.data_fingerprint(f2)
    # a file is the sha256 of its bytes (an independent hashlib computation)
    assert fp.file_fingerprint(f1) == hashlib.sha256(f1.read_bytes()).hexdigest()[:20]
    ds = Dataset.from_list(rows)
    assert fp.data_fingerprint(ds) == fp.data_fingerprint(Dataset.from_list(rows))
    assert fp.data_fingerprint(ds) != fp.data_fingerprint(Dataset.from_list(rows[::-1]))
    assert fp.data_fingerprint(ds.select([1])) == fp.data_fingerprint(Dataset.from_list(rows[1:]))
    assert fp.data_fingerprint(rows) != fp.data_fingerprint(rows[:1])


def test_model_fingerprint_folder_and_state_dict(tmp_path, tiny_model):
    model, tok = tiny_model
    a = tmp_path / "a"
    model.save_pretrained(a)
    first = fp.model_fingerprint(str(a))
    assert fp.model_fingerprint(model) == fp.model_fingerprint(model)
    in_memory = fp.model_fingerprint(model)
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] += 1e-3
    assert fp.model_fingerprint(model) != in_memory
    model.save_pretrained(a)
    assert fp.model_fingerprint(str(a)) != first
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError):
        fp.model_fingerprint(str(tmp_path / "empty"))


def test_changed_keys_and_stale_message():
    new = {"data": "1", "model": "2", "settings": "3"}
    assert fp.changed_keys(None, new) == ["data", "model", "settings"]
    assert fp.changed_keys({"data": "1", "model": "9", "settings": "3"}, new) == ["model"]
    assert fp.changed_keys(new, new) == []
    msg = fp.stale_message("cache X", ["model", "settings"], "delete X to start fresh.")
    assert "different model, settings" in msg and msg.endswith("delete X to start fresh.")
