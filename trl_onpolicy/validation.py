"""Input checks at the boundary: one mechanism for every config, CLI argument class and path.

Every check raises ``ValueError`` (or ``FileNotFoundError`` for a missing input) with a one-line message naming the
field or file, the value and what is accepted; `trl_onpolicy.cli` turns those into ``trl-onpolicy CMD: error: ...``
with exit status 2. Checks run before any work starts (before a model is loaded or a file is written).

Numeric fields are described by `Range` and checked with `check_fields`::

    check_fields(self, {"temperature": Range(lo=0), "top_p": Range(lo=0, hi=1, lo_open=True)}, owner="EvalConfig")

NaN and infinities are always refused (unless ``Range(allow_inf=True)``); ``None`` only with ``optional=True``.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Range:
    """Accepted values of one numeric field.

    Args:
        lo, hi: bounds (``None`` = unbounded on that side).
        lo_open, hi_open: exclude the bound itself.
        integer: the value must be a whole number (bool is refused).
        optional: ``None`` is accepted (meaning "unset").
        allow_inf: accept ``+inf``/``-inf`` (NaN never).
        also: extra accepted sentinel values outside the range (e.g. ``-1`` for "unset" max_steps).
    """

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    integer: bool = False
    optional: bool = False
    allow_inf: bool = False
    also: tuple = ()

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a finite number"
        if self.lo is not None and self.hi is not None:
            span = f" in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"
        elif self.lo is not None:
            span = f" {'>' if self.lo_open else '>='} {self.lo:g}"
        elif self.hi is not None:
            span = f" {'<' if self.hi_open else '<='} {self.hi:g}"
        else:
            span = ""
        extra = "".join(f" or {v!r}" for v in self.also) + (" or None" if self.optional else "")
        return f"{kind}{span}{extra}"

    def accepts(self, value) -> bool:
        if value is None:
            return self.optional
        if any(value == v and type(value) is type(v) for v in self.also):
            return True
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if math.isnan(value):
            return False
        if math.isinf(value) and not self.allow_inf:
            return False
        if self.integer and (isinstance(value, float) and not value.is_integer()):
            return False
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        if self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi):
            return False
        return True


# ranges used across configs
POSITIVE = Range(lo=0, lo_open=True)
NON_NEGATIVE = Range(lo=0)
FRACTION = Range(lo=0, hi=1)
PROBABILITY_OPEN_LOW = Range(lo=0, hi=1, lo_open=True)  # top_p
COUNT = Range(lo=1, integer=True)  # sizes and lengths that must be at least 1
OPTIONAL_COUNT = Range(lo=1, integer=True, optional=True)
ANY_FINITE = Range()


def invalid(owner: str | None, name: str, value, accepted: str) -> ValueError:
    """The one error message format: ``Owner.name=value is invalid: <accepted>.``"""
    where = f"{owner}.{name}" if owner else name
    return ValueError(f"{where}={value!r} is invalid: {accepted.rstrip('.')}.")


def check_value(name: str, value, rule: Range, owner: str | None = None) -> None:
    if not rule.accepts(value):
        raise invalid(owner, name, value, f"expected {rule.describe()}")


def check_fields(obj, rules: Mapping[str, Range], owner: str | None = None) -> None:
    """Check ``getattr(obj, name)`` (or ``obj[name]`` for a mapping) against each rule; fields absent from ``obj`` are
    skipped, so one table can serve several classes."""
    owner = owner if owner is not None else type(obj).__name__
    for name, rule in rules.items():
        if isinstance(obj, Mapping):
            if name not in obj:
                continue
            value = obj[name]
        elif hasattr(obj, name):
            value = getattr(obj, name)
        else:
            continue
        check_value(name, value, rule, owner)


def check_choice(name: str, value, choices: Iterable, owner: str | None = None) -> None:
    choices = list(choices)
    if value not in choices:
        raise invalid(owner, name, value, f"choose one of {choices}")


# ------------------------------------------------------------------------------------------------------------- paths
def _resolved(path) -> Path:
    return Path(os.path.expanduser(str(path))).resolve()


def looks_like_local_path(name: str) -> bool:
    """True for names that can only be a local path (``./x``, ``/x``, ``~/x``, ``x/y/z``, or an existing path); a
    Hub id is ``owner/name`` with no other slashes."""
    if not isinstance(name, str) or not name:
        return False
    if name.lower().startswith("embedded:"):
        return False
    if Path(os.path.expanduser(name)).exists():
        return True
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def check_input_path(path, what: str, *, must_be_dir: bool | None = None) -> Path:
    """A local input that must exist: raises FileNotFoundError naming ``what`` and the path."""
    p = _resolved(path)
    if not p.exists():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist (resolved to {p}).")
    if must_be_dir is True and not p.is_dir():
        raise ValueError(f"{what} {str(path)!r} is a file; expected a folder.")
    if must_be_dir is False and p.is_dir():
        raise ValueError(f"{what} {str(path)!r} is a folder; expected a file.")
    return p


def check_output_path(path, what: str, *, inputs: Iterable = (), is_dir: bool = True) -> Path:
    """An output location, checked before any work starts.

    Refuses: an output that is an existing file where a folder is expected (or the reverse); an output equal to one
    of ``inputs`` (a dataset file, a model folder: anything the job reads) or inside an input folder; a location that
    cannot be written (probed by creating and removing a temporary file). Leaves nothing behind.
    """
    if path is None or str(path) == "":
        raise ValueError(f"{what} is empty: give a path to write to.")
    p = _resolved(path)
    if is_dir and p.exists() and not p.is_dir():
        raise ValueError(f"{what} {str(path)!r} is an existing file; give a folder path.")
    if not is_dir and p.is_dir():
        raise ValueError(f"{what} {str(path)!r} is an existing folder; give a file path.")
    for src in inputs:
        if src is None or str(src) == "":
            continue
        s = _resolved(src)
        if s.exists() and (p == s or (s.is_dir() and p.is_relative_to(s))):
            raise ValueError(f"{what} {str(path)!r} would overwrite the input {str(src)!r}; write the output somewhere else.")
    # the deepest existing ancestor must be a folder we can write in
    probe = p if (is_dir and p.exists()) else next((a for a in p.parents if a.exists()), None)
    if probe is None:
        return p
    if not probe.is_dir():
        raise ValueError(f"{what} {str(path)!r} cannot be created: {probe} is a file.")
    try:
        fd, tmp = tempfile.mkstemp(dir=probe, prefix=".write-probe-")
        os.close(fd)
        os.unlink(tmp)
    except OSError as err:
        raise ValueError(f"{what} {str(path)!r} is not writable ({probe}: {err.strerror}).") from None
    return p
