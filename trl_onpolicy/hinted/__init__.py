"""Hinted Decoding: two streams of one model (with and without the reference as a hint) mixed by the hinted stream's
entropy (`decoding`), and the offline job that re-aligns a corpus with it (`realign`)."""

from .decoding import hinted_decode

__all__ = ["hinted_decode"]
