"""Per-token statistics of a causal LM's next-token distribution, without holding [tokens x vocabulary] logits.

TRL's fused LM head (``model(..., fused_lm_head=True)``) already gives differentiable ``log p`` and the entropy.
Two statistics of the method need more: the *varentropy* ``Var_{v~p}[log p(v)]`` (DDT's z statistic) and the
entropy of the distribution renormalised over its top-k logits (EAFT). `token_statistics` computes all of them in
one pass over vocabulary tiles, with a numerically stable merge of the tiles' weighted moments (Chan et al.'s
parallel variance, with weights ``exp(z - max)``): memory is one ``[token_chunk, vocab_chunk]`` tile.
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
    vocab_chunk: int = 16384,
    token_chunk: int = 1024,
) -> dict[str, torch.Tensor]:
    """Statistics of ``softmax(hidden @ weight.T)`` for every row of ``hidden`` ([N, H]); float32 outputs of shape [N].

    Returns ``entropy`` and ``varentropy``; with ``targets`` ([N] ids) also ``log_probs`` and ``is_top1``; with
    ``top_k`` also ``topk_entropy`` (entropy of the softmax over the k largest logits, before any normalisation).
    """
    n_tokens, vocab = hidden.shape[0], weight.shape[0]
    device = hidden.device
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
        # Running moments of each row's softmax over the tiles seen so far, all relative to the running max so that
        # large logits (|z| ~ 1e4) lose no precision to cancellation: run_w = sum exp(z - run_max), run_mu = E_p[z] -
        # run_max, run_m2 = sum exp(z - run_max) * (z - E_p[z])^2.
        run_max = run_w = run_mu = run_m2 = None
        target_z = torch.zeros(n, **f32)
        top = None
        for v0 in range(0, vocab, vocab_chunk):
            w_tile = weight[v0 : v0 + vocab_chunk]
            z = (h @ w_tile.to(h.dtype).t()).float()
            if bias is not None:
                z += bias[v0 : v0 + vocab_chunk].float()
            z = z * logit_scale
            if softcap is not None:
                z = softcap * torch.tanh(z / softcap)
            z = z / temperature

            t_max = z.max(-1).values
            d = z - t_max[:, None]
            e = torch.exp(d)
            t_w = e.sum(-1)
            t_mu = (e * d).sum(-1) / t_w
            t_m2 = (e * (d - t_mu[:, None]) ** 2).sum(-1)

            if run_max is None:
                run_max, run_w, run_mu, run_m2 = t_max, t_w, t_mu, t_m2
            else:
                # Chan et al.'s merge of two weighted moment sets, both re-expressed relative to the new max
                new_max = torch.maximum(run_max, t_max)
                scale_a, scale_b = torch.exp(run_max - new_max), torch.exp(t_max - new_max)
                a, b = run_w * scale_a, t_w * scale_b
                total = a + b
                mu_a, mu_b = run_mu + (run_max - new_max), t_mu + (t_max - new_max)
                delta = mu_b - mu_a
                run_m2 = run_m2 * scale_a + t_m2 * scale_b + delta**2 * a * b / total
                run_mu = mu_a + delta * b / total
                run_w, run_max = total, new_max

            if targets is not None:
                local = targets[t0 : t0 + n] - v0
                inside = (local >= 0) & (local < z.shape[1])
                picked = z.gather(1, local.clamp(0, z.shape[1] - 1)[:, None]).squeeze(1)
                target_z = torch.where(inside, picked, target_z)
            if top_k is not None:
                k = min(top_k, z.shape[1])
                cand = z.topk(k, dim=-1).values
                top = cand if top is None else torch.cat([top, cand], -1).topk(min(top_k, top.shape[1] + k), -1).values

        log_w = torch.log(run_w)
        sl = slice(t0, t0 + n)
        out["entropy"][sl] = log_w - run_mu
        out["varentropy"][sl] = (run_m2 / run_w).clamp(min=0)
        if targets is not None:
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
        from .losses import topk_entropy_from_logits

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
