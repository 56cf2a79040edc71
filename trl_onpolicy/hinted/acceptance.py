"""Judging a re-aligned response, offline (`trl_onpolicy.hinted.realign` filters) and online
(`trl_onpolicy.trainer.online.HintedDataCollator`): one acceptance rule and the DDT statistics of the response.

- `completion_text`: the text of the generated ids (without the final EOS), what is stored and what is graded;
- `resolve_checker`: ``(response, gold) -> bool`` from a checker name (the grader of `trl-onpolicy eval`);
- `accept_response` / `Acceptance`: THE acceptance rule (finished with EOS, final answer correct);
- `response_statistics`: DDT statistics (mean phi, z, ...) of responses under their plain prompts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

__all__ = ["Acceptance", "accept_response", "completion_text", "resolve_checker", "response_statistics"]


def completion_text(tokenizer, ids: list[int], eos: set[int]) -> str:
    """The text of a generated response (token ids), without its final EOS: what is stored and what is graded."""
    if ids and ids[-1] in eos:
        ids = ids[:-1]
    return tokenizer.decode(ids, skip_special_tokens=False)


def resolve_checker(spec: str | Callable | None) -> Callable | None:
    """``(response, gold) -> bool`` from a checker spec, or None for "none".

    A name in `trl_onpolicy.eval.answers.CHECKERS` ("math_verify", "numeric", "exact", "contains"), an importable
    ``"package.module:function"`` or a callable ``(extracted_answer, gold) -> bool``: the final answer is extracted
    from the response (``\\boxed{}``, ``#### N``, last number) and compared with the gold, exactly as
    `trl-onpolicy eval` grades."""
    if spec is None or spec in ("none", ""):
        return None
    from trl_onpolicy.eval.answers import grade_response, make_checker

    check = make_checker(spec)

    def checker(response: str, gold: str) -> bool:
        return bool(grade_response(response, str(gold), checker=check)[1])

    return checker


@dataclass(frozen=True)
class Acceptance:
    """Verdict on one re-aligned response: ``accepted``; ``correct`` (None when no answer check ran); ``reason`` a
    rejection names (``"unfinished"`` or ``"incorrect"``, None when accepted)."""

    accepted: bool
    correct: bool | None
    reason: str | None


def accept_response(text: str, finish_reason: str, answer, reference, checker: Callable | None, *,
                    require_eos: bool = True, require_correct: bool = True) -> Acceptance:
    """THE acceptance rule of re-aligned responses, offline (`realign` filters) and online
    (`trl_onpolicy.trainer.online.HintedDataCollator`): a response is accepted when it finished with EOS
    (``finish_reason == "eos"``) and its final answer is correct.

    The gold is ``answer`` (the answer column) when given, else ``reference`` (the reference solution), which the
    grader (`resolve_checker`, i.e. `trl_onpolicy.eval.answers.grade_response`) first reduces to its final answer (last
    ``\\boxed{}``, else ``#### N``): never the whole solution text. ``checker=None`` skips the answer check
    (``correct`` is None). ``require_eos``/``require_correct`` turn either condition off (the realign options
    ``drop_unfinished``/``drop_incorrect``); ``correct`` is reported either way."""
    gold = answer if answer not in (None, "") else reference
    correct = None if checker is None or gold in (None, "") else bool(checker(text, str(gold)))
    reason = None
    if require_eos and finish_reason != "eos":
        reason = "unfinished"
    elif require_correct and correct is False:
        reason = "incorrect"
    return Acceptance(reason is None, correct, reason)


@torch.no_grad()
def response_statistics(model, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], *,
                        batch_size: int = 8) -> list[dict]:
    """DDT statistics of each ``responses[i]`` (token ids) as a continuation of ``prompts[i]`` under ``model``:
    ``num_tokens``, ``mean_phi``, ``sum_phi``, ``z`` and the shares ``frac_phi_gt_-1/-3/-5``.

    Uses `trl_onpolicy.ddt.scoring.score_token_ids` (backbone once per batch, LM head in vocabulary tiles)."""
    from trl_onpolicy.ddt.scoring import score_token_ids
    from trl_onpolicy.ddt.statistics import sample_statistics

    if len(prompts) != len(responses):
        raise ValueError(f"prompts and responses differ in length ({len(prompts)} vs {len(responses)}).")
    sequences = [list(p) + list(r) for p, r in zip(prompts, responses)]
    masks = [[0] * len(p) + [1] * len(r) for p, r in zip(prompts, responses)]
    arrays = score_token_ids(model, sequences, masks, batch_size=batch_size)
    return [sample_statistics(a["phi"], a["varentropy"]) for a in arrays]
