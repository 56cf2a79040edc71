"""Tiny offline models and tokenizers for tests and benchmarks (no Hub access)."""

from .tiny import make_tiny_model, make_tiny_tokenizer

__all__ = ["make_tiny_model", "make_tiny_tokenizer"]
