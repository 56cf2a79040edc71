"""`trl-onpolicy` command line: the dispatcher (`main`) and one module per command."""

from .commands import COMMANDS, join_negative_values, main

__all__ = ["COMMANDS", "join_negative_values", "main"]
