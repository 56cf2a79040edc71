"""Hinted Decoding: two streams of one model (with and without the reference as a hint) mixed by the hinted stream's
entropy (`decoding`: the loop; `sampling`: the math; `cache`: forwards and KV cache), the prompts of both streams
(`prompts`), the acceptance rule of a re-aligned response (`acceptance`), and the offline job that re-aligns a corpus
with it (`realign`)."""

from .decoding import hinted_decode

__all__ = ["hinted_decode"]
