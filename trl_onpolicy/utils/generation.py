"""Plain batched generation from token-id prompts with `model.generate`, shared by the jobs that sample the model's own
responses (DDT's own-sample comparison, realign's analysis prefix and own samples, evaluation and preference pairs).

Hinted Decoding's two-stream generator is in `trl_onpolicy.hinted.decoding`; this module is the ordinary one-stream case.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


@dataclass
class SamplingConfig:
    """How responses are sampled, shared by evaluation (`EvalConfig`) and preference pairs (`PairConfig`).

    Args:
        num_samples: responses per prompt (>= 1).
        temperature: 0 = greedy; > 0 = sampling (with ``top_p``).
        top_p: nucleus threshold when sampling, in (0, 1].
        max_new_tokens: generation length limit (>= 1).
        batch_size: sequences per ``generate`` call (>= 1).
        seed: sampling seed.
    """

    num_samples: int = field(default=1, metadata={"help": "Responses sampled per prompt."})
    temperature: float = field(default=0.0, metadata={"help": "0 = greedy; > 0 = sampling with top_p."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus threshold when sampling, in (0, 1]."})
    max_new_tokens: int = field(default=256, metadata={"help": "Generation length limit."})
    batch_size: int = field(default=8, metadata={"help": "Sequences per generate call."})
    seed: int = field(default=0, metadata={"help": "Sampling seed."})

    def __post_init__(self):
        from trl_onpolicy.utils.validation import check_fields

        # NaN and inf refused: a NaN temperature passed `< 0` guards and silently meant greedy decoding
        check_fields(self, SAMPLING_RULES, owner=type(self).__name__)


def _sampling_rules():
    from trl_onpolicy.utils.validation import COUNT, NON_NEGATIVE, OPTIONAL_COUNT, POSITIVE, PROBABILITY_OPEN_LOW, Range

    return {
        "num_samples": COUNT, "temperature": NON_NEGATIVE, "top_p": PROBABILITY_OPEN_LOW, "max_new_tokens": COUNT,
        "batch_size": COUNT, "seed": Range(integer=True),
        # fields of the configs built on SamplingConfig (EvalConfig/EvalArguments, PairConfig/PairArguments)
        "check_workers": COUNT, "num_threads": OPTIONAL_COUNT, "max_resample_rounds": Range(lo=0, integer=True),
        "resample_temperature": POSITIVE, "num_prompts": COUNT, "data_seed": Range(integer=True),
    }


SAMPLING_RULES = _sampling_rules()


def eos_token_ids(model, tokenizer) -> list[int]:
    """The ids that end a sample: the model's ``generation_config.eos_token_id`` (an int or a list; falling back to
    ``config.eos_token_id``) together with the tokenizer's ``eos_token_id``."""
    found: set[int] = set()
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if value is not None:
            found.update([value] if isinstance(value, int) else value)
            break
    tok_eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    if tok_eos is not None:
        found.add(int(tok_eos))
    return sorted(int(i) for i in found)


@torch.no_grad()
def generate_ids(
    model,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    eos_ids: Sequence[int] | None = None,
) -> list[tuple[list[int], bool]]:
    """Continue one batch of token-id prompts (left-padded, KV cache): greedy when ``temperature <= 0``, else ancestral
    sampling with ``temperature`` and ``top_p`` (no top-k). Returns, per prompt, ``(ids, finished)``: the new ids up to
    and including the first EOS (``finished=True``), or all ``max_new_tokens`` of them. The caller seeds torch."""
    eos = list(eos_ids) if eos_ids is not None else eos_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts], device=device)
    attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    if temperature > 0:
        sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
    else:
        sampling = dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    was_training = model.training
    model.eval()
    try:
        out = model.generate(
            input_ids=input_ids, attention_mask=attention, max_new_tokens=max_new_tokens, eos_token_id=eos or None,
            pad_token_id=pad, use_cache=True, **sampling,
        )[:, width:].tolist()
    finally:
        model.train(was_training)
    results = []
    for ids in out:
        cut = next((j for j, t in enumerate(ids) if t in eos), None)
        results.append((ids, False) if cut is None else (ids[: cut + 1], True))
    return results
