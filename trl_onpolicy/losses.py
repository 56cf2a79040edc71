"""Token-loss family of on-policy SFT, as pure tensor functions.

Everything here takes per-token tensors (log-probabilities of the targets, entropies, masks) and returns per-token
tensors. Nothing here knows about models, trainers or data: the trainer (`trl_onpolicy.trainer.idft_trainer`) feeds these
functions with what TRL's fused LM head computes, and the tests compare them against a float64 full-softmax
recomputation.

Notation, for a target token y after a context, with the model's next-token distribution p over a vocabulary V:

- ``log_p = log p(y)``, the target's log-probability (differentiable);
- ``H = -sum_v p(v) log p(v)``, the entropy of the whole distribution (no gradient needed).

Every loss in the family is a weighted negative log-likelihood, ``loss_t = -w_t * log p_t``, with a weight ``w_t``
that carries no gradient (except for the legacy IDFT ``detach="gamma"`` mode, see `token_loss`):

| name   | weight w_t                                       | paper                                  |
|--------|--------------------------------------------------|----------------------------------------|
| `nll`  | 1                                                | plain SFT                              |
| `dft`  | sg(p_t)                                          | DFT, Wu et al. 2025 (arXiv 2508.05629) |
| `eaft` | sg(H~_t), normalised entropy                     | EAFT, Diao et al. 2026 (2601.02151)    |
| `idft` | sg(p_t ** gamma_t), gamma_t from phi_t = log p+H | IDFT, Zhang et al. 2026 (2602.12222)   |
"""

from __future__ import annotations

import math

import torch

TOKEN_LOSS_TYPES = ("nll", "dft", "eaft", "idft")
IDFT_DETACH_MODES = ("weight", "gamma")
EAFT_ENTROPY_MODES = ("topk", "full")


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """Detached copy in at least float32 (float64 inputs stay float64, so references can check to 1e-12)."""
    return x.detach().to(torch.promote_types(x.dtype, torch.float32))


def centered_log_likelihood(log_probs: torch.Tensor, entropy: torch.Tensor) -> torch.Tensor:
    """Distribution Discriminant Theory's per-token statistic, the centered log-likelihood.

    ``phi_t = log p(y_t) + H(p_t) = log p(y_t) - E_{v~p}[log p(v)]``.

    For a token sampled from the model itself ``E[phi] = 0``; off-policy tokens (a confident model disagreeing with
    the label) give ``phi << 0``. The result carries no gradient.
    """
    return _upcast(log_probs) + _upcast(entropy)


def idft_schedule(progress: float | None, warmup_ratio: float = 0.0, transition_ratio: float = 0.0) -> float:
    """Schedule value ``lambda`` in [0, 1] that blends IDFT's gamma from 1 (DFT) to its full value.

    ``progress`` is ``global_step / max_steps``. ``lambda = 0`` while ``progress < warmup_ratio``, then rises linearly
    over ``transition_ratio`` of training, then stays at 1. With an unknown total (``progress=None``) it is 1.
    """
    if progress is None:
        return 1.0
    if progress < warmup_ratio:
        return 0.0
    if transition_ratio <= 0.0:
        return 1.0
    return float(min(1.0, (progress - warmup_ratio) / transition_ratio))


def idft_gamma(
    phi: torch.Tensor,
    beta: float = 1.0,
    gamma_min: float = 0.1,
    gamma_max: float = 2.0,
    schedule: float = 1.0,
) -> torch.Tensor:
    """IDFT's per-token exponent.

    ``g = clamp(exp(-phi / beta), gamma_min, gamma_max)`` and ``gamma = 1 + schedule * (g - 1)``.

    On-policy tokens (phi ~ 0) get gamma ~ 1 (DFT); off-policy tokens (phi << 0) get up to ``gamma_max`` (their
    gradient is suppressed harder); over-confident tokens (phi > 0) get down to ``gamma_min`` (closer to SFT).
    ``schedule = 0`` gives gamma = 1 everywhere, i.e. exactly DFT. The result carries no gradient.
    """
    # exp(-phi/beta) overflows to inf for very negative phi, which the clamp maps to gamma_max as intended
    g = torch.exp(-_upcast(phi) / beta).clamp(min=gamma_min, max=gamma_max)
    return g if schedule == 1.0 else 1.0 + schedule * (g - 1.0)  # exact clamp values once the schedule is complete


def normalized_entropy(entropy: torch.Tensor, num_classes: int | torch.Tensor) -> torch.Tensor:
    """Entropy divided by its maximum ``ln(num_classes)``, a value in [0, 1]. No gradient."""
    return _upcast(entropy) / math.log(num_classes)


def topk_entropy_from_logits(logits: torch.Tensor, k: int = 20) -> torch.Tensor:
    """Entropy of the softmax renormalised over the ``k`` largest logits of each row (EAFT's original H~ before / ln k).

    Works on ``[..., V]`` logits; callers that cannot hold full logits use `trl_onpolicy.ops.lm_head.token_statistics`,
    which computes the same value tile by tile.
    """
    top = logits.to(torch.promote_types(logits.dtype, torch.float32)).topk(min(k, logits.shape[-1]), dim=-1).values
    log_q = top.log_softmax(dim=-1)
    return -(log_q.exp() * log_q).sum(-1)


def token_weights(
    loss_type: str,
    log_probs: torch.Tensor,
    entropy: torch.Tensor | None = None,
    *,
    beta: float = 1.0,
    gamma_min: float = 0.1,
    gamma_max: float = 2.0,
    schedule: float = 1.0,
    eaft_entropy: torch.Tensor | None = None,
    eaft_num_classes: int | None = None,
) -> dict[str, torch.Tensor]:
    """Detached per-token weights of the family, plus the intermediate statistics.

    Returns a dict with ``weight`` (``w_t`` of the table in the module docstring), and for ``idft`` also ``phi`` and
    ``gamma``. For ``eaft``, pass ``eaft_entropy`` (top-k or full entropy) and ``eaft_num_classes`` (k or |V|): the
    weight is ``eaft_entropy / ln(eaft_num_classes)``.
    """
    out: dict[str, torch.Tensor] = {}
    lp = _upcast(log_probs)
    if loss_type == "nll":
        out["weight"] = torch.ones_like(lp)
    elif loss_type == "dft":
        out["weight"] = lp.exp()
    elif loss_type == "eaft":
        if eaft_entropy is None or eaft_num_classes is None:
            raise ValueError("token_weights('eaft') needs `eaft_entropy` and `eaft_num_classes`.")
        out["weight"] = normalized_entropy(eaft_entropy, eaft_num_classes)
    elif loss_type == "idft":
        if entropy is None:
            raise ValueError("token_weights('idft') needs the per-token `entropy`.")
        phi = centered_log_likelihood(lp, entropy)
        gamma = idft_gamma(phi, beta, gamma_min, gamma_max, schedule)
        out.update(phi=phi, gamma=gamma, weight=torch.exp(gamma * lp))
    else:
        raise ValueError(f"Unknown token loss {loss_type!r}; expected one of {TOKEN_LOSS_TYPES}.")
    return out


def token_loss(
    loss_type: str,
    log_probs: torch.Tensor,
    entropy: torch.Tensor | None = None,
    *,
    detach: str = "weight",
    **weight_kwargs,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token loss ``-w_t * log p_t`` of the family and its statistics (see `token_weights`).

    ``detach`` only matters for ``idft``:

    - ``"weight"`` (current method, default): ``loss = -sg(p ** gamma) * log p``. Gradient w.r.t. the logits is
      ``-p**gamma * (e_y - p)``: always pushes the target up, just less for off-policy tokens.
    - ``"gamma"`` (the paper's first version, which most likely produced the published figure):
      ``loss = -p ** sg(gamma) * log p``. Its gradient ``-p**gamma (1 + gamma log p)(e_y - p)`` changes sign for
      ``p < exp(-1/gamma)``: unlikely targets are pushed down.

    Returns ``(per_token_loss, stats)``; positions where ``log_probs`` is 0 (masked by TRL's fused head) give loss 0.
    """
    if detach not in IDFT_DETACH_MODES:
        raise ValueError(f"Unknown IDFT detach mode {detach!r}; expected one of {IDFT_DETACH_MODES}.")
    stats = token_weights(loss_type, log_probs, entropy, **weight_kwargs)
    if loss_type == "idft" and detach == "gamma":
        # differentiable through p, not through gamma
        weight = torch.exp(stats["gamma"] * log_probs.to(stats["gamma"].dtype))
    else:
        weight = stats["weight"]
    per_token = -(weight * log_probs.to(weight.dtype))
    return per_token.to(log_probs.dtype), stats
