"""Shared offline fixtures: a tiny Qwen2-style model and tokenizer built in the test session (no Hub access)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import socket  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from trl_onpolicy.testing.tiny import make_tiny_model, make_tiny_tokenizer  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _unmarked_command():
    """Each test starts as a fresh command would: a test that calls a command's function directly (outside the
    dispatcher's `command_scope`) marks work as started, and that process-wide mark must not reach the next test."""
    from trl_onpolicy.utils.errors import command_scope

    with command_scope():
        yield


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tiny_tokenizer()


@pytest.fixture
def tiny_model(tiny_tokenizer):
    """A fresh random tiny model (float32) and its tokenizer."""
    model, _ = make_tiny_model(tiny_tokenizer)
    return model, tiny_tokenizer


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    """A saved tiny model folder, usable as `model_name_or_path` in recipes and CLIs."""
    path = tmp_path_factory.mktemp("tiny-model")
    model, tok = make_tiny_model(tiny_tokenizer)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def arithmetic_examples(n: int = 32, conversational: bool = True):
    rows = []
    for i in range(n):
        a, b = i % 10, (3 * i + 1) % 10
        q, s = f"What is {a} + {b}?", f"{a} + {b} = {a + b}. The answer is {a + b}."
        if conversational:
            rows.append({"prompt": [{"role": "user", "content": q}], "completion": [{"role": "assistant", "content": s}]})
        else:
            rows.append({"prompt": q + " ", "completion": s})
    return rows


def word_problem_rows(n: int) -> list[dict]:
    """(question, solution, answer) rows in SFT prompt/completion form, for the Hinted Decoding tests."""
    out = []
    for i in range(n):
        a, b = i % 7 + 1, (3 * i) % 5 + 2
        q = f"Tom has {a} apples and buys {b} more. How many apples does he have?"
        s = f"He has {a} + {b} = {a + b} apples. #### {a + b}"
        out.append({"prompt": [{"role": "user", "content": q}], "completion": [{"role": "assistant", "content": s}],
                    "question": q, "solution": s, "answer": str(a + b)})
    return out


@pytest.fixture
def arithmetic_dataset():
    from datasets import Dataset

    return Dataset.from_list(arithmetic_examples())


def free_port() -> int:
    """A free TCP port on localhost, for torchrun/accelerate rendezvous (tests run in parallel workers)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """The real SmolLM2-135M-Instruct tokenizer (the embedded model, converted once into the shared cache: about 30 s
    the first time on a machine). For tests about the real model's tokenization only."""
    from transformers import AutoTokenizer

    from trl_onpolicy.utils.models import smollm2_path

    return AutoTokenizer.from_pretrained(smollm2_path())


SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def import_script(name: str):
    """Yield the module of ``scripts/<name>.py`` (for a module-scoped fixture: ``yield from import_script(...)``);
    the scripts folder is on ``sys.path`` only meanwhile, as a script's own sibling imports expect."""
    import importlib
    import sys

    sys.path.insert(0, str(SCRIPTS))
    try:
        yield importlib.import_module(name)
    finally:
        sys.path.remove(str(SCRIPTS))
