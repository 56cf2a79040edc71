"""Per-token statistics of a causal LM's next-token distribution, without holding [tokens x vocabulary] logits.

TRL's fused LM head (``model(..., fused_lm_head=True)``) already gives differentiable ``log p`` and the entropy.
Two statistics of the method need more: the *varentropy* ``Var_{v~p}[log p(v)]`` (DDT's z statistic) and the
entropy of the distribution renormalised over its top-k logits (EAFT). `token_statistics` computes all of them in
one pass over vocabulary tiles, with a numerically stable merge of the tiles' weighted moments (Chan et al.'s
parallel variance, with weights ``exp(z - max)``): memory is about two ``[token_chunk, vocab_chunk]`` tiles. It is the
one implementation used by the IDFT trainer (EAFT's top-k entropy), DDT scoring (`trl_onpolicy.ddt.scoring`) and the tools
built on them; its tile arithmetic is in place and its tiles are cache-sized on CPU (`DEFAULT_TILES`), which makes
DDT scoring as fast as a plain forward pass (docs/benchmarks_ddt.md).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


def lm_head_transform(model: nn.Module) -> dict:
    """Logit transforms a model applies after its LM head projection (scale, soft-capping), read from its config.

    Mirrors what TRL's fused LM head (`trl.trainer.utils.add_fused_lm_head`) reads, so that `token_statistics` scores
    the same distribution that the trainer's loss sees.
    """
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    scale = getattr(config, "logit_scale", None)
    if scale is None:
        scale = getattr(config, "output_multiplier", None)
    if scale is None:
        scale = getattr(config, "lm_head_multiplier", None)
    if scale is None and getattr(config, "logits_scaling", None) is not None:
        # Granite and MiniCPM3 divide the logits by `logits_scaling`; HyperCLOVA X multiplies them by it
        scaling = config.logits_scaling
        scale = scaling if getattr(config, "model_type", None) == "hyperclovax" else 1.0 / scaling
    return {"logit_scale": 1.0 if scale is None else float(scale), "softcap": getattr(config, "final_logit_softcapping", None)}


# LM-head tiles [token_chunk x vocab_chunk] per device type: on CPU small enough to stay in cache (the statistics make
# several passes over a tile), on GPU large enough for few kernel launches. Measured in docs/benchmarks_ddt.md.
DEFAULT_TILES = {"cpu": (512, 2048), "cuda": (4096, 16384)}


def default_tiles(device: torch.device | str, token_chunk: int | None = None, vocab_chunk: int | None = None) -> tuple[int, int]:
    """``(token_chunk, vocab_chunk)`` for ``device``, keeping the values that are given (not None)."""
    tc, vc = DEFAULT_TILES["cpu" if torch.device(device).type == "cpu" else "cuda"]
    token_chunk, vocab_chunk = token_chunk or tc, vocab_chunk or vc
    if token_chunk < 1 or vocab_chunk < 1:
        raise ValueError(f"token_chunk and vocab_chunk must be >= 1 (or None for the device default); got "
                         f"token_chunk={token_chunk}, vocab_chunk={vocab_chunk}.")
    return token_chunk, vocab_chunk


def full_tensor(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """``tensor`` as one plain tensor: an FSDP2 shard (a DTensor) is gathered from every rank, as TRL's fused LM head
    does with the head's weight; anything else comes back as it is."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


@torch.no_grad()
def token_statistics(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    top_k: int | None = None,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    temperature: float = 1.0,
    vocab_chunk: int | None = None,
    token_chunk: int | None = None,
) -> dict[str, torch.Tensor]:
    """Statistics of ``softmax(hidden @ weight.T)`` for every row of ``hidden`` ([N, H]); float32 outputs of shape [N].

    Returns ``entropy`` and ``varentropy``; with ``targets`` ([N] ids) also ``log_probs`` and ``is_top1``; with
    ``top_k`` also ``topk_entropy`` (entropy of the softmax over the k largest logits, before any normalisation).
    ``vocab_chunk`` / ``token_chunk`` (None: `DEFAULT_TILES` for the device) set the logit tile. ``weight`` and
    ``bias`` may be FSDP2 shards (DTensors, outside the model's forward): they are gathered first (`full_tensor`).

    Each ``[token_chunk, vocab_chunk]`` tile of (transformed) logits ``z`` is shifted by its row maximum ``m`` in place
    and reduced to three sums, ``w = sum e``, ``S1 = sum e*s`` and ``S2 = sum e*s^2`` with ``s = z - m <= 0`` and
    ``e = exp(s)``: the tile's mean is ``m + S1/w`` and its centred second moment ``S2 - S1^2/w`` (no cancellation
    worth the name: ``|S1/w| <= log(vocab_chunk)``). Tiles are merged with Chan et al.'s parallel-variance formula,
    weighted by ``exp(m - running max)``, and every mean is kept *relative to the running maximum*, so that logits of
    size 1e4 lose nothing to float32 cancellation. Memory: about two tiles.
    """
    weight, bias = full_tensor(weight), full_tensor(bias)
    n_tokens, vocab = hidden.shape[0], weight.shape[0]
    device = hidden.device
    token_chunk, vocab_chunk = default_tiles(device, token_chunk, vocab_chunk)
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 (or None to skip the top-k entropy); got {top_k}.")
    f32 = dict(device=device, dtype=torch.float32)
    out = {name: torch.empty(n_tokens, **f32) for name in ("entropy", "varentropy")}
    if targets is not None:
        out["log_probs"] = torch.empty(n_tokens, **f32)
        out["is_top1"] = torch.empty(n_tokens, device=device, dtype=torch.bool)
    if top_k is not None:
        out["topk_entropy"] = torch.empty(n_tokens, **f32)

    for t0 in range(0, n_tokens, token_chunk):
        h = hidden[t0 : t0 + token_chunk]
        n = h.shape[0]
        # Running moments of each row's softmax over the tiles seen so far: run_w = sum exp(z - run_max),
        # run_mu = E_p[z] - run_max, run_m2 = sum exp(z - run_max) * (z - E_p[z])^2.
        run_max = run_w = run_mu = run_m2 = None
        target_z = torch.zeros(n, **f32)
        top = None
        tg = targets[t0 : t0 + n] if targets is not None else None
        for v0 in range(0, vocab, vocab_chunk):
            z = (h @ weight[v0 : v0 + vocab_chunk].to(h.dtype).t()).float()
            width = z.shape[1]
            if bias is not None:
                z += bias[v0 : v0 + vocab_chunk].float()
            if logit_scale != 1.0:
                z *= logit_scale
            if softcap is not None:
                z.div_(softcap).tanh_().mul_(softcap)
            if temperature != 1.0:
                z /= temperature
            if tg is not None:
                local = tg - v0
                inside = (local >= 0) & (local < width)
                picked = z.gather(1, local.clamp(0, width - 1)[:, None]).squeeze(1)
                target_z = torch.where(inside, picked, target_z)
            if top_k is not None:
                cand = z.topk(min(top_k, width), dim=-1).values
                top = cand if top is None else torch.cat([top, cand], -1).topk(min(top_k, top.shape[1] + cand.shape[1]), -1).values

            m = z.amax(-1)
            s = z.sub_(m[:, None])  # in place: the logits themselves are no longer needed
            e = s.exp()
            t_w = e.sum(-1)
            es = e.mul_(s)
            t_mu = es.sum(-1) / t_w  # tile mean relative to the tile max
            t_m2 = (es.mul_(s).sum(-1) - t_w * t_mu * t_mu).clamp_(min=0)

            if run_max is None:
                run_max, run_w, run_mu, run_m2 = m, t_w, t_mu, t_m2
            else:
                new_max = torch.maximum(run_max, m)
                decay_run, decay_tile = torch.exp(run_max - new_max), torch.exp(m - new_max)
                a, b = run_w * decay_run, t_w * decay_tile
                total = a + b
                mu_a, mu_b = run_mu + (run_max - new_max), t_mu + (m - new_max)
                delta = mu_b - mu_a
                run_m2 = run_m2 * decay_run + t_m2 * decay_tile + delta * delta * (a * b / total)
                # convex combination: exact when one side's weight underflows to 0, however far apart the means are
                run_mu = (a * mu_a + b * mu_b) / total
                run_w, run_max = total, new_max

        log_w = torch.log(run_w)
        sl = slice(t0, t0 + n)
        out["entropy"][sl] = log_w - run_mu
        out["varentropy"][sl] = (run_m2 / run_w).clamp(min=0)
        if tg is not None:
            out["log_probs"][sl] = (target_z - run_max) - log_w
            out["is_top1"][sl] = target_z >= run_max
        if top_k is not None:
            log_q = top.log_softmax(-1)
            out["topk_entropy"][sl] = -(log_q.exp() * log_q).sum(-1)
    return out


def full_softmax_statistics(logits: torch.Tensor, targets: torch.Tensor | None = None, top_k: int | None = None):
    """Reference implementation of `token_statistics` on materialised logits [N, V], in float64."""
    lp = logits.double().log_softmax(-1)
    p = lp.exp()
    entropy = -(p * lp).sum(-1)
    out = {"entropy": entropy, "varentropy": (p * (lp + entropy[:, None]) ** 2).sum(-1)}
    if targets is not None:
        out["log_probs"] = lp.gather(-1, targets[:, None]).squeeze(-1)
    if top_k is not None:
        from trl_onpolicy.losses import topk_entropy_from_logits

        out["topk_entropy"] = topk_entropy_from_logits(logits.double(), top_k).double()
    return out


def backbone(model: nn.Module) -> nn.Module:
    """The transformer body under a causal LM (the module whose output is ``last_hidden_state``), through PEFT too."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(inner, inner.base_model_prefix)


@contextlib.contextmanager
def capture_hidden_states(model: nn.Module) -> Iterator[dict]:
    """Within the block, every forward of ``model``'s backbone stores its detached ``last_hidden_state`` in the yielded
    dict under ``"hidden"``. Used to get EAFT's top-k entropy beside TRL's fused LM head without a second forward."""
    store: dict = {}

    def hook(_module, _args, output):
        hs = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
        store["hidden"] = hs.detach()

    handle = backbone(model).register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()
