"""Where a command's input checks end and its work begins.

A command checks all of its input first and refuses bad input with one line and exit status 2 (the dispatcher,
`trl_onpolicy.cli.commands`, prints a ``ValueError``/``FileNotFoundError`` that way). Once the checks have passed,
an error is no longer the user's input but a failure of the run (hours into training, a disk that filled up, a bug):
the dispatcher then shows the traceback and exits 1. Each command says where that line lies by calling
`work_started()` right after its last input check; the dispatcher asks `raised_during_work(err)` when an error
reaches it.

The mark is per command run: `command_scope()` clears it on entry and restores the caller's mark on exit, so a
command run inside another (or one test after another in the same process) starts unmarked. An error that leaves a
scope after the mark was set carries that fact with it (`raised_during_work`), for the handler of an outer scope.

`RecipeError` is the bad-input error of the training entry points (`trl_onpolicy.cli.recipe` and the modules it
uses); it lives here, below them all, so that each can raise it without importing the others.
"""

from __future__ import annotations

from contextlib import contextmanager

_started = False


def work_started() -> None:
    """Mark that the running command has checked its input and started its work: from now on an error is a failure
    (traceback, exit status 1), not bad input (one line, exit status 2)."""
    global _started
    _started = True


def has_work_started() -> bool:
    """Whether the running command has called `work_started()`."""
    return _started


def raised_during_work(err: BaseException) -> bool:
    """Whether ``err`` was raised after the command's `work_started()` (in this scope or in a scope it left)."""
    return _started or getattr(err, _DURING_WORK, False)


_DURING_WORK = "_trl_onpolicy_raised_during_work"


@contextmanager
def command_scope():
    """Run one command with the mark cleared; the mark of the code around it is restored afterwards. An exception
    raised after the command's `work_started()` is tagged on its way out (see `raised_during_work`)."""
    global _started
    outer, _started = _started, False
    try:
        yield
    except BaseException as err:
        if _started:
            try:
                setattr(err, _DURING_WORK, True)
            except (AttributeError, TypeError):  # an exception type without attributes: the mark is lost, not the error
                pass
        raise
    finally:
        _started = outer


class RecipeError(ValueError):
    """A recipe or command line that cannot run: the message says which key is wrong and how to fix it (raised by the
    training entry points, `trl_onpolicy.cli.recipe`, before their work starts)."""
