"""Markdown cells shared by the compare report (`trl_onpolicy.compare.report`) and its study section
(`trl_onpolicy.compare.selection`)."""

from __future__ import annotations

from trl_onpolicy.compare.units import rate_text


def _rate(lr) -> str:
    return "–" if lr is None else rate_text(lr)


def _stat(stat: dict | None, scale: float = 100.0, digits: int = 1, signed: bool = False) -> str:
    """``mean [low, high]`` (or the mean alone with one seed), scaled (100 = percent / points)."""
    if stat is None:
        return "–"
    f = (lambda x: f"{scale * x:+.{digits}f}") if signed else (lambda x: f"{scale * x:.{digits}f}")
    if stat.get("ci_low") is None:
        return f(stat["mean"])
    return f"{f(stat['mean'])} [{f(stat['ci_low'])}, {f(stat['ci_high'])}]"


def _val(x, scale=1.0, digits=3, signed=False) -> str:
    if x is None:
        return "–"
    return f"{scale * x:+.{digits}f}" if signed else f"{scale * x:.{digits}f}"


def _row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"
