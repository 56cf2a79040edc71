"""Hinted Decoding: sample from a geometric mixture of two streams of one model (method.md section 3).

For every sample there are two prompts: the *hinted* prompt (question + reference solution, distribution ``p``)
and the *plain* prompt (the ordinary training prompt, distribution ``q``). Both streams advance in lock-step and
every chosen token is appended to both. At each step

    Hn     = H(p) / ln V                      (V = size of the model's output distribution, logits.shape[-1])
    lambda = f(Hn)                            (see `mixing_lambda`)
    log m  = (1 - lambda) log p + lambda log q, renormalised

and the next token is drawn from ``m``. The first token comes from the hinted stream alone (lambda = 0); once the
``splitter`` string appears in the decoded output only the plain stream decodes (lambda = 1).

Unlike the authors' loop (one sample, full-prefix recompute per token), `hinted_decode` batches samples, keeps a
KV cache, left-pads prompts with a proper attention mask and position ids, and advances the hinted and plain rows
of all samples in one forward pass per step (a batch of ``2 * B`` rows). Finished rows (and hinted rows after the
splitter) are dropped from the cache as they finish.

The loop's own work per step does not grow with the length of the output: the repetition guard is a rolling hash
with a counter (`RepetitionGuard`), the splitter is looked for in the last few tokens only, and only after tokens
that can end it (`SplitterWatch`), row bookkeeping lives in index tensors, and the KV cache keeps spare room instead
of being concatenated at every step. The tokens are the same as recounting and re-decoding the whole output at
every step (tests/test_hinted.py checks this against a no-cache reference loop).

The small pure functions (`normalized_entropy`, `mixing_lambda`, `mix_log_probs`, `top_p_filter`,
`select_tokens`, `repetition_counts`) hold the math; `hinted_decode` is the batching loop around them.
"""

from __future__ import annotations

import inspect
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch

LAMBDA_MODES = ("linear", "sigmoid", "piecewise")
SAMPLING_ORDERS = ("top_p_first", "temperature_first")

__all__ = [
    "HintedResult",
    "hinted_decode",
    "mixing_lambda",
    "mix_log_probs",
    "normalized_entropy",
    "repetition_counts",
    "RepetitionGuard",
    "SplitterWatch",
    "select_tokens",
    "inverse_cdf_sample",
    "top_p_filter",
    "resolve_eos_token_ids",
]


@dataclass
class HintedResult:
    """One sample's output of `hinted_decode`.

    - ``token_ids``: generated ids, including the EOS id that ended the sample (if any);
    - ``finish_reason``: ``"eos"``, ``"length"`` (max_new_tokens reached) or ``"repetition"`` (repetition guard);
    - ``lambda_mean``: mean mixing weight over the generated tokens (0 = hinted stream, 1 = plain stream),
      counting the first token (0) and tokens after the splitter (1);
    - ``lambdas``: the per-token weights (only with ``return_lambdas=True``);
    - ``entropy_mean``: mean normalised entropy ``H(p)/ln V`` of the hinted stream over the mixed steps
      (None if no step was mixed);
    - ``splitter_pos``: number of tokens generated when the splitter first appeared in the decoded text (tokens
      from this index on were decoded by the plain stream alone), or None.
    """

    token_ids: list[int]
    finish_reason: str
    lambda_mean: float
    lambdas: list[float] | None = None
    entropy_mean: float | None = None
    splitter_pos: int | None = None
    extras: dict = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


# ----------------------------------------------------------------------------------------------------------------
# pure math
# ----------------------------------------------------------------------------------------------------------------


def normalized_entropy(log_probs: torch.Tensor) -> torch.Tensor:
    """Entropy of each row of normalised ``log_probs`` ([..., V]) divided by ``ln V``; float32 in [0, 1]."""
    log_probs = log_probs.float()
    probs = log_probs.exp()
    # 0 * log 0 = 0 (rows may hold -inf for masked tokens)
    plogp = torch.where(probs > 0, probs * log_probs, torch.zeros_like(probs))
    return -plogp.sum(-1) / math.log(log_probs.shape[-1])


def mixing_lambda(
    hn: torch.Tensor,
    mode: str = "linear",
    *,
    beta: float = 3.0,
    center: float = 0.5,
    h1: float = 0.1,
    h2: float = 0.4,
) -> torch.Tensor:
    """Weight of the plain stream as a function of the hinted stream's normalised entropy ``hn``.

    - ``linear``:    ``clamp(beta * hn, 0, 1)`` (the authors' default);
    - ``sigmoid``:   ``sigmoid(beta * (hn - center))``;
    - ``piecewise``: 0 for ``hn <= h1``, 1 for ``hn >= h2``, linear in between, ``(hn - h1) / (h2 - h1)``
      (``beta`` is not used in this mode).
    """
    hn = hn.float()
    if mode == "linear":
        return (beta * hn).clamp(0.0, 1.0)
    if mode == "sigmoid":
        return torch.sigmoid(beta * (hn - center))
    if mode == "piecewise":
        return ((hn - h1) / (h2 - h1)).clamp(0.0, 1.0)
    raise ValueError(f"lambda_mode must be one of {LAMBDA_MODES}, got {mode!r}.")


def mix_log_probs(log_p: torch.Tensor, log_q: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """Normalised log of the geometric mixture ``p^(1-lam) q^lam`` (rows of [..., V]; ``lam`` of shape [...]).

    Exact at ``lam`` = 0 or 1 even where a distribution holds ``-inf`` (no ``0 * inf``)."""
    lam = lam.float().unsqueeze(-1)
    log_p, log_q = log_p.float(), log_q.float()
    mixed = (1.0 - lam) * log_p + lam * log_q
    mixed = torch.where(lam == 0, log_p, torch.where(lam == 1, log_q, mixed))
    return mixed - mixed.logsumexp(-1, keepdim=True)


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Set to ``-inf`` every logit outside the nucleus: the smallest set of most likely tokens whose probability
    (under ``softmax(logits)``) reaches ``top_p``. The most likely token is always kept."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    before = probs.cumsum(-1) - probs  # mass strictly before each token
    drop_sorted = before >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def select_tokens(
    log_m: torch.Tensor,
    *,
    temperature: float,
    top_p: float,
    generators: Sequence[torch.Generator | None] | torch.Generator | None = None,
    order: str = "top_p_first",
    uniforms: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pick one token per row of the mixture log-probabilities ``log_m`` ([R, V]) -> [R] long.

    ``temperature == 0`` is greedy (argmax). Otherwise ``order="top_p_first"`` (method.md: "top-p 0.95 then
    temperature 0.3") keeps the nucleus of the mixture itself and then sharpens what is left by ``1/temperature``;
    ``"temperature_first"`` is Hugging Face ``generate``'s order (temperature, then the nucleus of the tempered
    distribution, which is smaller). ``generators``: None (global RNG), one generator for all rows, or one per
    row (then a row's draw depends only on its own generator, not on the other rows); see `inverse_cdf_sample`.
    ``uniforms``: the [R] float64 draws to use instead of ``generators`` (the decoder draws each sample's uniforms
    for the whole response at once: ``torch.rand(n)`` on a CPU generator gives the same numbers as ``n`` calls
    ``torch.rand(1)``).
    """
    if temperature == 0:
        return log_m.argmax(-1)
    if order == "top_p_first":
        logits = top_p_filter(log_m, top_p) / temperature
    elif order == "temperature_first":
        logits = top_p_filter(log_m / temperature, top_p)
    else:
        raise ValueError(f"sampling_order must be one of {SAMPLING_ORDERS}, got {order!r}.")
    if uniforms is None:
        uniforms = _uniforms(generators, logits.shape[0])
    return inverse_cdf_sample(logits.softmax(-1), uniforms)


def _uniforms(generators, rows: int) -> torch.Tensor:
    """``rows`` float64 uniforms in [0, 1) on the CPU: from the global RNG, one shared generator, or one per row."""
    if generators is None or isinstance(generators, torch.Generator):
        device = generators.device if generators is not None else "cpu"
        return torch.rand(rows, generator=generators, dtype=torch.float64, device=device).cpu()
    if len(generators) != rows:
        raise ValueError(f"got {len(generators)} generators for {rows} rows")
    return torch.cat([torch.rand(1, generator=g, dtype=torch.float64, device=g.device).cpu() for g in generators])


def inverse_cdf_sample(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Draw one index per row of ``probs`` ([R, V], rows summing to ~1) from ``uniforms`` ([R] in [0, 1)).

    The uniforms are drawn on the CPU from per-row generators, so a row's draw depends only on its own seed and
    the whole batch is sampled with one vectorised search (no per-row kernel on a GPU). Tokens of probability 0
    are never chosen."""
    cum = probs.double().cumsum(-1)
    total = cum[:, -1]
    # stay strictly below the total so the search always lands on a token of positive probability
    target = torch.minimum(uniforms.to(cum.device, torch.float64) * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cum, target.unsqueeze(-1), right=True).squeeze(-1)


def repetition_counts(tokens: torch.Tensor, window: int) -> torch.Tensor:
    """For each row of ``tokens`` ([B, n], all rows of equal length), how many times its last ``window`` tokens
    occur in the row (overlapping occurrences count, the last one included). 0 if the row is shorter than
    ``window``. A loop of period ``k <= window`` reaches count ``c`` after ``window + (c - 1) * k`` tokens."""
    n = tokens.shape[-1]
    if n < window:
        return torch.zeros(tokens.shape[0], dtype=torch.long, device=tokens.device)
    windows = tokens.unfold(-1, window, 1)  # [B, n - window + 1, window]
    last = tokens[:, n - window :].unsqueeze(1)
    return (windows == last).all(-1).sum(-1)


class RepetitionGuard:
    """`repetition_counts` kept up to date one token at a time, in constant work per step.

    Each sample's last ``window`` tokens are summarised by a rolling polynomial hash (two moduli below 2^31, so
    every product fits in int64), updated with one vectorised operation per step; a `collections.Counter` keyed by
    the hash with the sample index mixed in counts how often each window has occurred. Equal windows have equal hashes, so the hashed
    count is never below the true count; when it reaches ``count`` the row is checked exactly with
    `repetition_counts` (once per stopping sample; a hash collision is then rejected), so the rule is the same as
    recounting the whole prefix at every step."""

    _MOD = torch.tensor([2_147_483_647, 2_147_483_629])  # two primes below 2^31
    _BASE = torch.tensor([1_000_003, 1_000_033])
    _SAMPLE_MIX = 0x5851F42D4C957F2D  # odd 63-bit constant (products wrap in int64)

    def __init__(self, num_samples: int, window: int, count: int):
        self.window, self.count = window, count
        self.hash = torch.zeros(num_samples, 2, dtype=torch.long)
        # weight of the token that leaves the window: base^window mod m
        self.drop = torch.tensor([pow(int(b), window, int(m)) for b, m in zip(self._BASE, self._MOD)])
        self.seen: Counter = Counter()

    def update(self, tokens: torch.Tensor, samples: torch.Tensor, sample_list: list[int], step: int) -> torch.Tensor:
        """Account for token ``tokens[s, step]`` of every sample ``s`` in ``samples`` (``sample_list`` is the same
        as a list); return a bool tensor over ``samples``: True where the guard fires after this token."""
        h = self.hash.index_select(0, samples) * self._BASE + (tokens[samples, step] + 1).unsqueeze(-1)
        if step >= self.window:
            h = h - (tokens[samples, step - self.window] + 1).unsqueeze(-1) * self.drop
        h = h.remainder(self._MOD)
        self.hash[samples] = h
        if step + 1 < self.window:
            return torch.zeros(len(sample_list), dtype=torch.bool)
        # one int per (sample, window): the sample index is mixed into the hash (a clash only raises a count,
        # which the exact check below catches)
        keys = (((h[:, 0] << 31) | h[:, 1]) ^ (samples * self._SAMPLE_MIX)).tolist()
        self.seen.update(keys)
        hit = torch.tensor(list(map(self.seen.__getitem__, keys))) >= self.count
        if bool(hit.any()):
            for j in hit.nonzero().flatten().tolist():  # exact check, once per sample that stops
                s = sample_list[j]
                hit[j] = bool(repetition_counts(tokens[s : s + 1, : step + 1], self.window)[0] >= self.count)
        return hit


class SplitterWatch:
    """Detects the first time ``splitter`` appears in a sample's decoded output, in constant work per step.

    A first occurrence must end in the newest token. Two cheap facts are used:

    - the newest token can end an occurrence only if the text it adds holds the splitter's last character, or a
      U+FFFD (it cuts or completes a multi-byte character). What a token adds is read once per token id, after a
      fixed anchor token, and cached (`may_end`); tokens that cannot end an occurrence cost one tensor lookup;
    - an occurrence spans at most ``len(splitter.encode())`` tokens when every token decodes to at least one byte
      (byte-level BPE, SentencePiece with byte fallback). For the other rows only the last that many tokens plus a
      margin are decoded (`hits`), so a multi-byte character cut at the start of the tail (shown as U+FFFD) or a
      decoder's leading-space rule there stays clear of the occurrence.

    Both together find the splitter at the same step as searching the whole decoded output after every token."""

    MARGIN = 8

    def __init__(self, tokenizer, splitter: str):
        self.tokenizer, self.splitter = tokenizer, splitter
        self.tail = len(splitter.encode("utf-8")) + self.MARGIN
        self.anchor = list(tokenizer("a", add_special_tokens=False)["input_ids"]) or [0]
        self.anchor_text = tokenizer.decode(self.anchor)
        self.flags = torch.full((0,), -1, dtype=torch.int8)  # per token id: -1 unknown, 0 cannot end, 1 may end

    def _adds_ending(self, token_id: int) -> bool:
        text = self.tokenizer.decode(self.anchor + [token_id])
        if not text.startswith(self.anchor_text):
            return True
        added = text[len(self.anchor_text):]
        return not added or "\ufffd" in added or self.splitter[-1] in added

    def may_end(self, new_tokens: torch.Tensor) -> torch.Tensor:
        """Bool tensor over ``new_tokens`` ([R] CPU ids): can this token end an occurrence of the splitter?"""
        top = int(new_tokens.max()) + 1 if len(new_tokens) else 0
        if top > len(self.flags):
            self.flags = torch.cat([self.flags, self.flags.new_full((top - len(self.flags),), -1)])
        flags = self.flags[new_tokens]
        if bool((flags < 0).any()):
            for t in new_tokens[flags < 0].unique().tolist():
                self.flags[t] = int(self._adds_ending(t))
            flags = self.flags[new_tokens]
        return flags > 0

    def hits(self, tokens: torch.Tensor, samples: torch.Tensor, step: int) -> list[bool]:
        """For every sample in ``samples`` whose tokens ``0..step`` are in ``tokens``: is the splitter in its decoded
        output now? (Decodes the tail only; call it for the rows whose newest token `may_end` an occurrence.)"""
        lo = max(0, step + 1 - self.tail)
        texts = self.tokenizer.batch_decode(tokens[samples, lo : step + 1].tolist())
        return [self.splitter in text for text in texts]


# ----------------------------------------------------------------------------------------------------------------
# input handling
# ----------------------------------------------------------------------------------------------------------------


def _as_id_lists(ids, name: str) -> list[list[int]]:
    if isinstance(ids, torch.Tensor):
        raise ValueError(
            f"{name} must be a list with one prompt per sample (lists of ints or 1-D tensors), not a single tensor; "
            f"a padded 2-D tensor would make padding part of the prompt. Use [row[mask.bool()].tolist() ...]."
        )
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
        raise ValueError(f"{name} must be a list of token-id lists (one per sample), got {type(ids).__name__}.")
    out = []
    for i, row in enumerate(ids):
        if isinstance(row, torch.Tensor):
            if row.dim() != 1:
                raise ValueError(f"{name}[{i}] must be a 1-D tensor of token ids, got shape {tuple(row.shape)}.")
            row = row.tolist()
        elif isinstance(row, (str, bytes)) or not isinstance(row, Sequence):
            raise ValueError(f"{name}[{i}] must be a list of token ids (did you pass text? tokenize it first).")
        row = [int(t) for t in row]
        if not row:
            raise ValueError(f"{name}[{i}] is empty: every prompt needs at least one token.")
        out.append(row)
    return out


def _output_vocab_size(model) -> int | None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if weight is not None and weight.dim() == 2 and weight.shape[0] > 0:
        return int(weight.shape[0])
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    size = getattr(config, "vocab_size", None)
    return int(size) if size else None


def resolve_eos_token_ids(model, tokenizer, eos_token_ids=None) -> list[int]:
    """The ids that end a sample: ``eos_token_ids`` if given, else `trl_onpolicy.utils.generation.eos_token_ids` (the
    model's generation-config EOS ids together with the tokenizer's)."""
    if eos_token_ids is not None:
        ids = [eos_token_ids] if isinstance(eos_token_ids, int) else list(eos_token_ids)
        return sorted({int(i) for i in ids})
    from trl_onpolicy.utils.generation import eos_token_ids as default_eos_ids

    return default_eos_ids(model, tokenizer)


def _validate(beta, lambda_mode, lambda_center, lambda_h1, lambda_h2, max_new_tokens, temperature, top_p,
              repetition_window, repetition_count, batch_size, sampling_order):
    from trl_onpolicy.utils.validation import COUNT, NON_NEGATIVE, OPTIONAL_COUNT, PROBABILITY_OPEN_LOW, Range, check_choice, check_value

    check_choice("lambda_mode", lambda_mode, LAMBDA_MODES, "hinted_decode")
    checks = {"beta": (beta, NON_NEGATIVE), "max_new_tokens": (max_new_tokens, COUNT),
              "temperature": (temperature, NON_NEGATIVE), "top_p": (top_p, PROBABILITY_OPEN_LOW),
              "batch_size": (batch_size, OPTIONAL_COUNT)}
    if lambda_mode == "sigmoid":
        checks["lambda_center"] = (lambda_center, Range())
    if lambda_mode == "piecewise":
        checks.update(lambda_h1=(lambda_h1, Range()), lambda_h2=(lambda_h2, Range()))
    if repetition_window is not None and repetition_count is not None:
        checks.update(repetition_window=(repetition_window, COUNT), repetition_count=(repetition_count, Range(lo=2, integer=True)))
    for name, (value, rule) in checks.items():
        check_value(name, value, rule, "hinted_decode")
    if lambda_mode == "piecewise" and not lambda_h1 < lambda_h2:
        raise ValueError(
            f"piecewise mode needs finite lambda_h1 < lambda_h2 (thresholds on H/ln V), got {lambda_h1!r}, {lambda_h2!r}."
        )
    if sampling_order not in SAMPLING_ORDERS:
        raise ValueError(f"sampling_order must be one of {SAMPLING_ORDERS}, got {sampling_order!r}.")


def _forward_params(model) -> dict:
    try:
        return dict(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return {}


def _forward_kwargs(model) -> dict:
    """Ask the model for the last position's logits only, when its forward accepts it."""
    params = _forward_params(model)
    if "logits_to_keep" in params:
        return {"logits_to_keep": 1}
    if "num_logits_to_keep" in params:
        return {"num_logits_to_keep": 1}
    return {}


def _cache_argument(model) -> str:
    """The name under which the model's forward takes the KV cache: ``cache`` (transformers >= 5.2x, where
    ``past_key_values`` is deprecated) or ``past_key_values`` (older releases, and models that still use it)."""
    return "cache" if "cache" in _forward_params(model) else "past_key_values"


def _cache_of(out):
    """The KV cache of a forward's output, read without touching the deprecated ``past_key_values`` alias."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


# ----------------------------------------------------------------------------------------------------------------
# the decoder
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def hinted_decode(
    model,
    tokenizer,
    hinted_input_ids,
    plain_input_ids,
    *,
    beta: float = 3.0,
    lambda_mode: str = "linear",
    lambda_center: float = 0.5,
    lambda_h1: float = 0.1,
    lambda_h2: float = 0.4,
    splitter: str | None = None,
    max_new_tokens: int = 512,
    temperature: float = 0.3,
    top_p: float = 0.95,
    eos_token_ids: int | Sequence[int] | None = None,
    repetition_window: int | None = 30,
    repetition_count: int | None = 5,
    seed: int | Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    batch_size: int | None = None,
    return_lambdas: bool = False,
    sampling_order: str = "top_p_first",
    pad_token_id: int | None = None,
    prefill: str = "auto",
    progress: bool = False,
) -> list[HintedResult]:
    """Hinted Decoding of a batch of samples; returns one `HintedResult` per sample, in input order.

    Args:
        model: any Hugging Face causal LM (``model(input_ids, attention_mask, position_ids, past_key_values)``).
            It is put in eval mode for the call and restored afterwards.
        tokenizer: used to decode the output for the ``splitter`` check and for default EOS/pad ids; its ids must
            fit the model's output vocabulary (a larger model vocabulary, as in Qwen, is fine). May be None when
            no splitter is used and ``eos_token_ids`` is given.
        hinted_input_ids / plain_input_ids: one prompt per sample (lists of ints or 1-D tensors, unpadded).
        beta, lambda_mode, lambda_center, lambda_h1, lambda_h2: the mixing rule, see `mixing_lambda`.
        splitter: once this string appears in the decoded output, only the plain stream decodes.
        max_new_tokens: at most this many tokens per sample (finish reason ``"length"``).
        temperature, top_p, sampling_order: 0 = greedy; else top-p filtering of the mixture then temperature
            (``sampling_order="top_p_first"``, method.md's order) or HF's order (``"temperature_first"``).
        eos_token_ids: ids that end a sample (default: `resolve_eos_token_ids`). Finish reason ``"eos"``.
        repetition_window, repetition_count: stop with ``"repetition"`` once the last ``repetition_window``
            tokens occur ``repetition_count`` times in the output (see `repetition_counts`); None (either) disables.
        seed: an int (sample ``i`` then draws from its own generator seeded ``seed + i``) or one seed per sample;
            either way a sample's draws do not depend on the rest of the batch or on ``batch_size``.
        generator: a single ``torch.Generator`` shared by all rows instead (results then depend on batch order).
        batch_size: samples per chunk (each chunk runs ``2 * batch_size`` rows); None = all at once. With
            chunking, samples are grouped by prompt length to reduce padding.
        return_lambdas: keep the per-token lambdas in ``result.lambdas``.
        pad_token_id: id written at padded positions (masked; default: the tokenizer's pad, else an EOS id).
        prefill: ``"joint"`` prefills hinted and plain rows in one forward padded to the longest prompt;
            ``"separate"`` prefills them in two forwards and stacks the caches (less padding computed; needs a plain
            `DynamicCache`); ``"auto"`` = separate when possible, else joint. Decoding is one forward per step
            either way.
        progress: show a tqdm bar over samples.
    """
    if prefill not in ("auto", "separate", "joint"):
        raise ValueError(f"prefill must be 'auto', 'separate' or 'joint', got {prefill!r}.")
    _validate(beta, lambda_mode, lambda_center, lambda_h1, lambda_h2, max_new_tokens, temperature, top_p,
              repetition_window, repetition_count, batch_size, sampling_order)
    if seed is not None and generator is not None:
        raise ValueError("Pass either seed or generator, not both.")
    if repetition_window is None or repetition_count is None:  # either one None disables the guard
        repetition_window = repetition_count = None
    hinted = _as_id_lists(hinted_input_ids, "hinted_input_ids")
    plain = _as_id_lists(plain_input_ids, "plain_input_ids")
    if len(hinted) != len(plain):
        raise ValueError(f"hinted_input_ids has {len(hinted)} prompts but plain_input_ids has {len(plain)}: one of each per sample.")
    n = len(hinted)
    if n == 0:
        return []
    if splitter is not None and (not isinstance(splitter, str) or not splitter):
        raise ValueError(f"splitter must be a non-empty string or None, got {splitter!r}.")
    if splitter is not None and tokenizer is None:
        raise ValueError("A tokenizer is needed to detect the splitter in the decoded output.")

    vocab = _output_vocab_size(model)
    if vocab is not None and tokenizer is not None and len(tokenizer) > vocab:
        raise ValueError(
            f"The tokenizer has {len(tokenizer)} tokens but the model's output layer has only {vocab}: its ids do not "
            f"fit the model's vocabulary. Use the tokenizer that belongs to this model (or resize the embeddings)."
        )
    if vocab is not None:
        for name, rows in (("hinted_input_ids", hinted), ("plain_input_ids", plain)):
            for i, row in enumerate(rows):
                lo, hi = min(row), max(row)
                if lo < 0 or hi >= vocab:
                    raise ValueError(f"{name}[{i}] holds token id {hi if hi >= vocab else lo}, outside the model's vocabulary [0, {vocab}).")

    eos_ids = resolve_eos_token_ids(model, tokenizer, eos_token_ids)
    if pad_token_id is None:
        pad_token_id = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
        if pad_token_id is None:
            pad_token_id = eos_ids[0] if eos_ids else 0

    if seed is not None:
        seeds = [int(seed) + i for i in range(n)] if isinstance(seed, int) else [int(s) for s in seed]
        if len(seeds) != n:
            raise ValueError(f"seed has {len(seeds)} entries for {n} samples: pass an int or one seed per sample.")
    else:
        seeds = None

    device = next(model.parameters()).device
    order = list(range(n))
    if batch_size is not None and batch_size < n:
        order.sort(key=lambda i: (len(hinted[i]), len(plain[i])))
    chunk = batch_size or n
    chunks = [order[k : k + chunk] for k in range(0, n, chunk)]

    settings = dict(
        beta=beta, lambda_mode=lambda_mode, lambda_center=lambda_center, lambda_h1=lambda_h1, lambda_h2=lambda_h2,
        splitter=splitter, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, eos_ids=eos_ids,
        repetition_window=repetition_window, repetition_count=repetition_count, return_lambdas=return_lambdas,
        sampling_order=sampling_order, pad_token_id=pad_token_id, forward_kwargs=_forward_kwargs(model),
        prefill=prefill,
    )
    results: list[HintedResult | None] = [None] * n
    was_training = model.training
    model.eval()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc="hinted decoding", unit="sample")
    try:
        for idx in chunks:
            gens = None
            if seeds is not None:
                gens = [torch.Generator().manual_seed(seeds[i]) for i in idx]  # CPU: same draws on any device
            elif generator is not None:
                gens = generator
            chunk_results = _decode_chunk(model, tokenizer, [hinted[i] for i in idx], [plain[i] for i in idx],
                                          device=device, generators=gens, **settings)
            for i, r in zip(idx, chunk_results):
                results[i] = r
            if bar is not None:
                bar.update(len(idx))
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    return results  # type: ignore[return-value]


def _left_pad(prompts: list[list[int]], pad_token_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    for r, p in enumerate(prompts):
        input_ids[r, width - len(p):] = torch.tensor(p)
        attention[r, width - len(p):] = 1
    return input_ids.to(device), attention.to(device)


def _plain_dynamic_cache(cache) -> bool:
    from transformers.cache_utils import DynamicCache, DynamicLayer

    layers = getattr(cache, "layers", None)
    return (type(cache) is DynamicCache and bool(layers)
            and all(type(layer) is DynamicLayer and getattr(layer, "keys", None) is not None for layer in layers))


_BUFFERED_LAYER = None


def _buffered_layer_class():
    """A `DynamicLayer` whose keys and values are views of buffers with spare room: appending a token writes one
    position instead of concatenating (copying) the whole cache, as `DynamicLayer.update` does at every step. The
    buffers double when full, so the copying is amortised O(1) per token; `batch_select_indices` selects rows of
    the buffers. The attention sees the same values as with a plain `DynamicLayer`."""
    global _BUFFERED_LAYER
    if _BUFFERED_LAYER is None:
        from transformers.cache_utils import DynamicLayer

        class BufferedDynamicLayer(DynamicLayer):
            def _set_views(self):
                self.keys = self._key_buffer[..., : self._length, :]
                self.values = self._value_buffer[..., : self._length, :]

            def _reserve(self, capacity: int):
                def grown(buffer):
                    new = buffer.new_empty((*buffer.shape[:-2], capacity, buffer.shape[-1]))
                    new[..., : self._length, :] = buffer[..., : self._length, :]
                    return new

                self._key_buffer, self._value_buffer = grown(self._key_buffer), grown(self._value_buffer)

            def update(self, key_states, value_states, *args, **kwargs):
                n, m = self._length, key_states.shape[-2]
                if n + m > self._key_buffer.shape[-2]:
                    self._reserve(max(n + m, 2 * self._key_buffer.shape[-2]))
                self._key_buffer[..., n : n + m, :] = key_states
                self._value_buffer[..., n : n + m, :] = value_states
                self._length = n + m
                self._set_views()
                return self.keys, self.values

            def batch_select_indices(self, indices):
                self._key_buffer = self._key_buffer.index_select(0, indices)
                self._value_buffer = self._value_buffer.index_select(0, indices)
                self._set_views()

            def crop(self, tokens_to_remove: int) -> None:
                super().crop(tokens_to_remove)
                self._length = self.keys.shape[-2]

        _BUFFERED_LAYER = BufferedDynamicLayer
    return _BUFFERED_LAYER


def _use_buffered_layers(cache, room: int) -> None:
    """Turn the layers of a plain `DynamicCache` into `_buffered_layer_class` layers with ``room`` spare positions
    (no-op for any other cache)."""
    if not _plain_dynamic_cache(cache):
        return
    cls = _buffered_layer_class()
    for layer in cache.layers:
        keys, values = layer.keys, layer.values
        layer.__class__ = cls
        layer._length = keys.shape[-2]
        layer._key_buffer, layer._value_buffer = keys, values
        layer._reserve(keys.shape[-2] + room)
        layer._set_views()


def _separate_prefill(model, hinted, plain, pad_token_id, device, forward_kwargs):
    """Prefill the hinted and the plain prompts in two forwards, each padded only to its own longest prompt, then
    stack the two KV caches (the shorter one left-padded with zeros that the attention mask hides). This avoids
    computing the plain rows' padding up to the (usually much longer) hinted width. Returns ``(None, None)`` when
    the model's cache is not a plain `DynamicCache` (sliding-window, hybrid, ...): the caller then prefills jointly."""
    outs, masks = [], []
    for prompts in (hinted, plain):
        ids, mask = _left_pad(prompts, pad_token_id, device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **forward_kwargs)
        if not _plain_dynamic_cache(_cache_of(out)):
            return None, None
        outs.append(out)
        masks.append(mask)
    width = max(m.shape[1] for m in masks)

    def pad_left(t: torch.Tensor, dim: int) -> torch.Tensor:
        missing = width - t.shape[dim]
        if missing == 0:
            return t
        shape = list(t.shape)
        shape[dim] = missing
        return torch.cat([t.new_zeros(shape), t], dim=dim)

    cache, other = _cache_of(outs[0]), _cache_of(outs[1])
    for layer, layer_p in zip(cache.layers, other.layers):
        layer.keys = torch.cat([pad_left(layer.keys, -2), pad_left(layer_p.keys, -2)], dim=0)
        layer.values = torch.cat([pad_left(layer.values, -2), pad_left(layer_p.values, -2)], dim=0)
    attention = torch.cat([pad_left(m, 1) for m in masks], dim=0)
    logits = torch.cat([outs[0].logits[:, -1:], outs[1].logits[:, -1:]], dim=0)

    return SimpleNamespace(logits=logits, cache=cache), attention


def _decode_chunk(model, tokenizer, hinted, plain, *, device, generators, beta, lambda_mode, lambda_center, lambda_h1,
                  lambda_h2, splitter, max_new_tokens, temperature, top_p, eos_ids, repetition_window,
                  repetition_count, return_lambdas, sampling_order, pad_token_id, forward_kwargs, prefill):
    """Decode one chunk of samples. The host work per step does not grow with the length: row bookkeeping is held
    in index tensors that change only when a sample finishes or splits, the repetition guard and the splitter check
    are incremental (`RepetitionGuard`, `SplitterWatch`), per-token records go into preallocated buffers, and the
    attention mask is a view of a preallocated buffer instead of a concatenation per step."""
    b = len(hinted)
    prompts = hinted + plain  # rows 0..b-1 hinted, b..2b-1 plain
    out = None
    if prefill in ("auto", "separate"):
        out, attention = _separate_prefill(model, hinted, plain, pad_token_id, device, forward_kwargs)
        if out is None and prefill == "separate":
            raise ValueError("prefill='separate' needs a model whose cache is a plain DynamicCache; use 'joint'.")
    if out is None:
        input_ids, attention = _left_pad(prompts, pad_token_id, device)
        position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=input_ids, attention_mask=attention, position_ids=position_ids, use_cache=True,
                    **forward_kwargs)
    cache = _cache_of(out)
    _use_buffered_layers(cache, min(max_new_tokens, 256))
    cache_arg = _cache_argument(model)
    can_prune = hasattr(cache, "batch_select_indices")
    next_pos = torch.tensor([len(p) for p in prompts], device=device)
    prompt_width = attention.shape[1]
    # the attention mask of step t is attn[:, : prompt_width + t + 1]; columns past the prompt are all ones
    attn = torch.cat([attention, attention.new_ones((attention.shape[0], max_new_tokens))], dim=1)

    # the rows in the batch (CPU): which sample each row belongs to and whether it is the hinted one
    row_sample = torch.arange(2 * b).remainder(b)
    row_hinted = torch.arange(2 * b) < b
    # for every sample, the row of its plain stream and the row its hinted logits are read from (the plain row
    # once the hinted row has been dropped after the splitter)
    plain_row = torch.arange(b) + b
    hinted_row = torch.arange(b)

    tokens = torch.full((b, max_new_tokens), -1, dtype=torch.long)  # generated ids, on CPU
    lam_buf = torch.zeros((b, max_new_tokens), dtype=torch.float32, device=device)
    ent_buf = torch.zeros((b, max_new_tokens), dtype=torch.float32, device=device)
    mixed_buf = torch.zeros((b, max_new_tokens), dtype=torch.bool)  # steps whose lambda came from the entropy
    eos = torch.tensor(eos_ids, dtype=torch.long)
    active = torch.arange(b)  # samples still decoding, ascending
    active_list = active.tolist()
    active_dev = active.to(device)
    split = torch.zeros(b, dtype=torch.bool)
    split_at: list[int | None] = [None] * b
    finish: list[str | None] = [None] * b
    finished = torch.zeros(b, dtype=torch.bool)
    guard = RepetitionGuard(b, repetition_window, repetition_count) if repetition_window is not None else None
    watch = SplitterWatch(tokenizer, splitter) if splitter is not None else None
    uniforms = None
    if isinstance(generators, list) and temperature > 0:
        # each sample's draws for the whole response, from its own generator (same numbers as one draw per step)
        uniforms = torch.stack([torch.rand(max_new_tokens, generator=g, dtype=torch.float64,
                                           device=g.device if g is not None else "cpu").cpu() for g in generators])
    rows_dev = torch.cat([hinted_row, plain_row]).to(device)

    for step in range(max_new_tokens):
        n_act = len(active_list)
        logits = out.logits[:, -1, :].index_select(0, rows_dev).float()
        log_p, log_q = logits[:n_act].log_softmax(-1), logits[n_act:].log_softmax(-1)
        hn = normalized_entropy(log_p)
        lam = mixing_lambda(hn, lambda_mode, beta=beta, center=lambda_center, h1=lambda_h1, h2=lambda_h2)
        if step == 0:
            lam = torch.zeros_like(lam)  # the first token comes from the hinted stream alone
            mixed = torch.zeros(n_act, dtype=torch.bool)
        else:
            is_split = split[active]
            mixed = ~is_split
            if watch is not None:
                lam = torch.where(is_split.to(device), torch.ones_like(lam), lam)
        log_m = mix_log_probs(log_p, log_q, lam)
        chosen = select_tokens(log_m, temperature=temperature, top_p=top_p, order=sampling_order,
                               generators=None if uniforms is not None else generators,
                               uniforms=uniforms[active, step] if uniforms is not None else None).cpu()

        tokens[active, step] = chosen
        lam_buf[active_dev, step] = lam
        ent_buf[active_dev, step] = hn
        mixed_buf[active, step] = mixed

        done = torch.isin(chosen, eos)
        repeated = guard.update(tokens, active, active_list, step) if guard is not None else None
        if repeated is not None:
            done = done | repeated
        if step + 1 == max_new_tokens:
            done = torch.ones_like(done)
        any_done = bool(done.any())
        if any_done:
            is_eos = torch.isin(chosen, eos)
            for j in done.nonzero().flatten().tolist():
                s = active_list[j]
                finish[s] = "eos" if is_eos[j] else ("repetition" if repeated is not None and repeated[j] else "length")
        new_split = False
        if watch is not None:
            look = ~done & ~split[active]
            if bool(look.any()):
                look &= watch.may_end(chosen)
            if bool(look.any()):
                candidates = active[look]
                for s, hit in zip(candidates.tolist(), watch.hits(tokens, candidates, step)):
                    if hit:
                        split[s], split_at[s], new_split = True, step + 1, True
        if any_done:
            finished[active[done]] = True
            active = active[~done]
            active_list = active.tolist()
            if not active_list:
                break
            active_dev = active.to(device)

        if can_prune and (any_done or new_split):
            # keep the plain rows of live samples and the hinted rows of live samples that have not split
            keep = ~finished[row_sample] & ~(row_hinted & split[row_sample])
            if not bool(keep.all()):
                keep_idx = keep.nonzero().flatten()
                keep_dev = keep_idx.to(device)
                cache.batch_select_indices(keep_dev)
                attn = attn.index_select(0, keep_dev)
                next_pos = next_pos.index_select(0, keep_dev)
                row_sample, row_hinted = row_sample[keep_idx], row_hinted[keep_idx]
                positions = torch.arange(len(row_sample))
                plain_row[row_sample[~row_hinted]] = positions[~row_hinted]
                hinted_row.copy_(plain_row)
                hinted_row[row_sample[row_hinted]] = positions[row_hinted]
        if any_done or new_split:
            rows_dev = torch.cat([hinted_row[active], plain_row[active]]).to(device)

        step_ids = tokens[row_sample, step]
        if not can_prune:
            step_ids = step_ids.masked_fill(finished[row_sample], pad_token_id)
        out = model(input_ids=step_ids.unsqueeze(-1).to(device), attention_mask=attn[:, : prompt_width + step + 1],
                    position_ids=next_pos.unsqueeze(-1), use_cache=True, **{cache_arg: cache}, **forward_kwargs)
        cache = _cache_of(out)
        next_pos = next_pos + 1

    lam_rows, ent_rows = lam_buf.cpu().tolist(), ent_buf.cpu().tolist()
    lengths = (tokens >= 0).sum(-1).tolist()
    results = []
    for s in range(b):
        n = lengths[s]
        lams = lam_rows[s][:n]
        ents = [e for e, m in zip(ent_rows[s][:n], mixed_buf[s, :n].tolist()) if m]
        results.append(HintedResult(
            token_ids=tokens[s, :n].tolist(),
            finish_reason=finish[s] or "length",
            lambda_mean=float(sum(lams) / len(lams)) if lams else 0.0,
            lambdas=list(lams) if return_lambdas else None,
            entropy_mean=float(sum(ents) / len(ents)) if ents else None,
            splitter_pos=split_at[s],
        ))
    return results
