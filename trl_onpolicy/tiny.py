"""Tiny, offline causal LMs for tests, benchmarks and smoke runs (no Hub access).

`make_tiny_tokenizer` trains a byte-level BPE tokenizer (every string is encodable) with ChatML specials and TRL's
Qwen2.5 chat template; `make_tiny_model` builds a randomly initialised `Qwen2ForCausalLM` around it. A saved folder
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
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 20, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", additional_special_tokens=SPECIAL_TOKENS[1:]
    )
    fast.chat_template = chat_template()
    return fast


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
