"""Tiny, offline causal LMs for tests, benchmarks and smoke runs (no Hub access).

`make_tiny_tokenizer` trains a byte-level BPE `Qwen2Tokenizer` (every string is encodable) with ChatML specials and
TRL's Qwen2.5 chat template; `make_tiny_model` builds a randomly initialised `Qwen2ForCausalLM` around it. A saved folder
loads with `AutoModelForCausalLM/AutoTokenizer.from_pretrained` like any Hub model, so recipes can name it.
"""

from __future__ import annotations

from pathlib import Path

import torch

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

_CORPUS = [
    "Question: what is 12 + 7? Answer: 12 + 7 = 19. The answer is 19.",
    "Tom has 3 apples and buys 4 more. Now he has 3 + 4 = 7 apples. #### 7",
    "A train travels 60 miles per hour for 2 hours, so it covers 120 miles. \\boxed{120}",
    "The quick brown fox jumps over the lazy dog. Step by step, we add the numbers.",
    "user assistant system You are a helpful assistant. Let's think step by step.",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 + - * / = ( ) . , ? !",
]


def chat_template() -> str:
    import trl

    return (Path(trl.__file__).parent / "chat_templates" / "qwen2_5.jinja").read_text()


def make_tiny_tokenizer(vocab_size: int = 512):
    """A byte-level BPE `Qwen2Tokenizer` trained on a few sentences, with ChatML specials and TRL's Qwen2.5 template.

    It is trained with Qwen2's own normaliser and pre-tokeniser (digits split one by one) and returned as a
    `Qwen2Tokenizer`, so a saved copy reloads through `AutoTokenizer` (which picks `Qwen2Tokenizer` for a Qwen2 model
    folder) into exactly the same tokenizer.
    """
    import json

    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 20, trainer)
    bpe = json.loads(tok.to_str())["model"]
    qwen = Qwen2Tokenizer(
        vocab=bpe["vocab"],
        merges=[tuple(m) for m in bpe["merges"]],
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
    )
    qwen.chat_template = chat_template()
    return qwen


def make_tiny_model(tokenizer=None, *, hidden_size: int = 64, num_layers: int = 2, extra_vocab: int = 0, seed: int = 0):
    """A random Qwen2 model sized for ``tokenizer`` (plus ``extra_vocab`` unused rows, as Qwen models have)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = tokenizer or make_tiny_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tokenizer) + extra_vocab,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def save_tiny(path: str | Path, **kwargs) -> Path:
    """Build and save a tiny model and tokenizer to ``path``; returns the path."""
    path = Path(path)
    model, tokenizer = make_tiny_model(**kwargs)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
