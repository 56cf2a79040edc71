"""The sampling math of Hinted Decoding (`trl_onpolicy.hinted.decoding`), as small tensor functions.

At each step the decoder has the hinted stream's log-probabilities ``log p`` and the plain stream's ``log q`` and:

- measures the hinted stream's normalised entropy ``Hn = H(p) / ln V`` (`hinted_entropy`);
- maps it to the plain stream's weight ``lambda`` (`mixing_lambda`: linear, sigmoid or piecewise);
- forms the renormalised geometric mixture ``(1 - lambda) log p + lambda log q`` (`mix_log_probs`);
- keeps the nucleus and applies the temperature (`top_p_filter`, `select_tokens`) and draws one token per row from
  per-sample uniforms (`inverse_cdf_sample`), so a sample's draws do not depend on the rest of the batch.

Two stop rules kept up to date in constant work per token also live here: the repetition guard (`repetition_counts`
and its incremental form `RepetitionGuard`) and the splitter detector (`SplitterWatch`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch

from trl_onpolicy.losses import normalized_entropy

LAMBDA_MODES = ("linear", "sigmoid", "piecewise")
SAMPLING_ORDERS = ("top_p_first", "temperature_first")

__all__ = [
    "LAMBDA_MODES", "SAMPLING_ORDERS", "entropy_from_log_probs", "hinted_entropy", "mixing_lambda", "mix_log_probs",
    "top_p_filter", "select_tokens", "inverse_cdf_sample", "repetition_counts", "RepetitionGuard", "SplitterWatch",
]

def entropy_from_log_probs(log_probs: torch.Tensor) -> torch.Tensor:
    """Entropy ``-sum_v p log p`` of each row of normalised ``log_probs`` ([..., V]), in float32; a ``-inf`` entry
    (a masked token) adds 0, not NaN."""
    log_probs = log_probs.float()
    probs = log_probs.exp()
    return -torch.where(probs > 0, probs * log_probs, torch.zeros_like(probs)).sum(-1)


def hinted_entropy(log_probs: torch.Tensor) -> torch.Tensor:
    """The mixing rule's input: the entropy of each row of ``log_probs`` divided by ``ln V`` (``V`` =
    ``log_probs.shape[-1]``), in [0, 1], through `trl_onpolicy.losses.normalized_entropy`."""
    return normalized_entropy(entropy_from_log_probs(log_probs), log_probs.shape[-1])


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
