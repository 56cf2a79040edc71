"""`trl_onpolicy.ops.lm_head`: tiled token statistics against float64 full-softmax recomputations and TRL's fused LM head."""

import math

import pytest
import torch

from trl_onpolicy.ops.lm_head import (
    DEFAULT_TILES,
    backbone,
    default_tiles,
    capture_hidden_states,
    full_softmax_statistics,
    lm_head_transform,
    token_statistics,
)


def naive_statistics(logits: torch.Tensor, targets: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    """Row-by-row float64 recomputation with plain Python sums (independent of both implementations under test)."""
    out = {name: [] for name in ("entropy", "varentropy", "log_probs", "topk_entropy")}
    for row, y in zip(logits.double().tolist(), targets.tolist()):
        m = max(row)
        log_z = m + math.log(sum(math.exp(z - m) for z in row))
        lp = [z - log_z for z in row]
        h = -sum(math.exp(v) * v for v in lp)
        out["entropy"].append(h)
        out["varentropy"].append(sum(math.exp(v) * (v + h) ** 2 for v in lp))
        out["log_probs"].append(lp[y])
        top = sorted(row, reverse=True)[:k]
        tm = top[0]
        t_log_z = tm + math.log(sum(math.exp(z - tm) for z in top))
        out["topk_entropy"].append(-sum(math.exp(z - t_log_z) * (z - t_log_z) for z in top))
    return {name: torch.tensor(vals, dtype=torch.float64) for name, vals in out.items()}


def reference_logits(hidden, weight, bias=None, logit_scale=1.0, softcap=None, temperature=1.0):
    z = hidden.double() @ weight.double().t()
    if bias is not None:
        z = z + bias.double()
    z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


def assert_stats_close(got, ref, atol, rtol=1e-5, names=("entropy", "varentropy", "log_probs", "topk_entropy")):
    for name in names:
        assert got[name].dtype == torch.float32, name
        torch.testing.assert_close(
            got[name].double(), ref[name].double(), atol=atol, rtol=rtol, msg=lambda m, name=name: f"{name}: {m}"
        )


def test_full_softmax_reference_matches_naive_loop():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(9, 31, generator=g, dtype=torch.float64) * 3
    targets = torch.randint(0, 31, (9,), generator=g)
    ref = full_softmax_statistics(logits, targets, top_k=20)
    naive = naive_statistics(logits, targets, 20)
    for name in naive:
        assert ref[name].dtype == torch.float64
        torch.testing.assert_close(ref[name], naive[name], atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize(
    "vocab_chunk,token_chunk",
    [(16384, 1024), (50, 7), (13, 64), (7, 1), (1, 5)],
    ids=["one-tile", "v50-t7", "v13-t64", "v7-t1", "v1-t5"],
)
@pytest.mark.parametrize("with_bias", [False, True])
def test_token_statistics_matches_float64_reference(vocab_chunk, token_chunk, with_bias):
    g = torch.Generator().manual_seed(1)
    n, hdim, vocab = 23, 16, 101
    # Rows of very different sharpness: from near-uniform to near-deterministic distributions
    hidden = torch.randn(n, hdim, generator=g) * torch.logspace(-1.5, 1, n)[:, None]
    weight = torch.randn(vocab, hdim, generator=g)
    bias = torch.randn(vocab, generator=g) if with_bias else None
    targets = torch.randint(0, vocab, (n,), generator=g)
    targets[:5] = reference_logits(hidden[:5], weight, bias).argmax(-1)  # some top-1 targets

    got = token_statistics(hidden, weight, targets, bias, top_k=20, vocab_chunk=vocab_chunk, token_chunk=token_chunk)
    logits = reference_logits(hidden, weight, bias)
    ref = full_softmax_statistics(logits, targets, top_k=20)
    assert_stats_close(got, ref, atol=2e-5)
    assert torch.equal(got["is_top1"], logits.argmax(-1) == targets)
    assert got["is_top1"][:5].all()


@pytest.mark.parametrize("logit_scale,softcap,temperature", [(0.25, None, 1.0), (1.0, 3.0, 1.0), (2.0, 5.0, 0.7)])
def test_token_statistics_logit_transforms(logit_scale, softcap, temperature):
    g = torch.Generator().manual_seed(2)
    hidden, weight = torch.randn(17, 8, generator=g) * 2, torch.randn(60, 8, generator=g)
    targets = torch.randint(0, 60, (17,), generator=g)
    kw = dict(logit_scale=logit_scale, softcap=softcap, temperature=temperature)
    got = token_statistics(hidden, weight, targets, top_k=20, vocab_chunk=16, token_chunk=6, **kw)
    ref = full_softmax_statistics(reference_logits(hidden, weight, **kw), targets, top_k=20)
    assert_stats_close(got, ref, atol=2e-5)
    # The transform matters: the untransformed statistics are different
    plain = token_statistics(hidden, weight, targets, vocab_chunk=16)
    assert (plain["entropy"] - got["entropy"]).abs().max() > 1e-2


@pytest.mark.parametrize("magnitude", [1e2, 1e3, 3e4])
@pytest.mark.parametrize("vocab_chunk", [7, 1000])
def test_token_statistics_extreme_logits(magnitude, vocab_chunk):
    """Logits of size up to 3e4: the hidden states are one-hot so the logits are exactly the weight entries."""
    g = torch.Generator().manual_seed(3)
    vocab, hdim = 90, 6
    weight = torch.randn(vocab, hdim, generator=g) * magnitude
    # A near tie at the top of column 0, far from the max elsewhere: sharp, moderately flat and tied rows
    weight[11, 0] = weight[:, 0].max() + 1.0
    weight[40, 0] = weight[11, 0] - 0.5
    weight[:, 1] = magnitude + torch.randn(vocab, generator=g) * 0.01  # all logits huge and nearly equal
    hidden = torch.eye(hdim)
    targets = torch.tensor([40, 5, 7, 11, 0, 89])
    got = token_statistics(hidden, weight, targets, top_k=20, vocab_chunk=vocab_chunk, token_chunk=4)
    for name in ("entropy", "varentropy", "log_probs", "topk_entropy"):
        assert torch.isfinite(got[name]).all(), name
    ref = full_softmax_statistics(weight.t().double(), targets, top_k=20)
    # Absolute errors stay at float32 round-off of O(1) quantities, not of the logits' magnitude
    assert_stats_close(got, ref, atol=1e-5, names=("entropy", "varentropy", "topk_entropy"))
    # log p of far-off targets is itself O(magnitude): float32 relative accuracy there, O(1e-5) absolute near the top
    torch.testing.assert_close(got["log_probs"].double(), ref["log_probs"], atol=1e-5, rtol=1e-6)
    assert abs(got["log_probs"][0].item() - ref["log_probs"][0].item()) < 1e-5  # the near-tied runner-up
    # Row 1 is nearly uniform over the vocabulary
    assert abs(got["entropy"][1].item() - math.log(vocab)) < 1e-3


def test_token_statistics_uniform_and_empty():
    hidden, weight = torch.zeros(3, 4), torch.randn(50, 4)
    got = token_statistics(hidden, weight, torch.tensor([0, 1, 49]), top_k=20, vocab_chunk=9)
    torch.testing.assert_close(got["entropy"], torch.full((3,), math.log(50)))
    torch.testing.assert_close(got["varentropy"], torch.zeros(3), atol=1e-6, rtol=0)
    torch.testing.assert_close(got["log_probs"], torch.full((3,), -math.log(50)))
    torch.testing.assert_close(got["topk_entropy"], torch.full((3,), math.log(20)))
    empty = token_statistics(torch.zeros(0, 4), weight, torch.zeros(0, dtype=torch.long), top_k=5)
    assert all(v.shape == (0,) for v in empty.values())


def test_token_statistics_bf16_inputs():
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(12, 16, generator=g).bfloat16()
    weight = torch.randn(70, 16, generator=g).bfloat16()
    targets = torch.randint(0, 70, (12,), generator=g)
    got = token_statistics(hidden, weight, targets, top_k=20, vocab_chunk=32)
    # The reference scores the bf16 matmul's own logits (the projection precision is the caller's choice)
    ref = full_softmax_statistics((hidden @ weight.t()).double(), targets, top_k=20)
    assert_stats_close(got, ref, atol=1e-4)


def test_default_tiles_per_device_and_bad_sizes():
    assert default_tiles("cpu") == DEFAULT_TILES["cpu"] and default_tiles(torch.device("cuda", 0)) == DEFAULT_TILES["cuda"]
    assert default_tiles("cpu", token_chunk=7) == (7, DEFAULT_TILES["cpu"][1])
    assert default_tiles("cpu", vocab_chunk=3) == (DEFAULT_TILES["cpu"][0], 3)
    hidden, weight = torch.randn(4, 3), torch.randn(10, 3)
    with pytest.raises(ValueError, match="vocab_chunk"):
        token_statistics(hidden, weight, vocab_chunk=-1)
    with pytest.raises(ValueError, match="top_k"):
        token_statistics(hidden, weight, top_k=0)


class _Config:
    def __init__(self, **kw):
        self.__dict__.update(kw)


class _Model:
    def __init__(self, **kw):
        self.config = _Config(**kw)


@pytest.mark.parametrize(
    "attrs,expected",
    [
        ({}, {"logit_scale": 1.0, "softcap": None}),
        ({"logit_scale": 0.125}, {"logit_scale": 0.125, "softcap": None}),
        ({"final_logit_softcapping": 30.0}, {"logit_scale": 1.0, "softcap": 30.0}),
        ({"logits_scaling": 4.0, "model_type": "granite"}, {"logit_scale": 0.25, "softcap": None}),
        ({"logits_scaling": 4.0, "model_type": "hyperclovax"}, {"logit_scale": 4.0, "softcap": None}),
        ({"output_multiplier": 0.5}, {"logit_scale": 0.5, "softcap": None}),
        ({"lm_head_multiplier": 2.0}, {"logit_scale": 2.0, "softcap": None}),
    ],
)
def test_lm_head_transform_reads_config(attrs, expected):
    assert lm_head_transform(_Model(**attrs)) == expected


@pytest.mark.parametrize("transform", [{}, {"logit_scale": 0.5, "final_logit_softcapping": 10.0}])
def test_token_statistics_agrees_with_trl_fused_head(tiny_model, transform):
    """Same log p and entropy as TRL's fused LM head (the numbers the trainer trains on), incl. scale and softcap."""
    from trl.trainer.utils import add_fused_lm_head

    model, tok = tiny_model
    for key, value in transform.items():
        setattr(model.config, key, value)
    with torch.no_grad():  # make the distribution far from uniform
        model.lm_head.weight.mul_(40)
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    ids = torch.tensor([tok("Tom has 3 apples and buys 4 more. Now he has 3 + 4 = 7 apples. #### 7")["input_ids"]])
    labels = ids.clone()
    with torch.no_grad(), capture_hidden_states(model) as captured:
        fused = model(input_ids=ids, labels=labels, fused_lm_head=True)
    hidden = captured["hidden"][:, :-1].reshape(-1, model.config.hidden_size)
    got = token_statistics(hidden, model.lm_head.weight, ids[:, 1:].reshape(-1), top_k=20, vocab_chunk=100,
                           **lm_head_transform(model))
    torch.testing.assert_close(got["log_probs"], fused.log_probs.reshape(-1), atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(got["entropy"], fused.entropy.reshape(-1), atol=2e-5, rtol=1e-5)
    assert torch.equal(got["is_top1"], fused.is_top1.reshape(-1))
    assert fused.entropy.std() > 0.1


def test_capture_hidden_states_plain_and_peft(tiny_model):
    from peft import LoraConfig, get_peft_model

    model, tok = tiny_model
    ids = torch.tensor([tok("The answer is 19.")["input_ids"]])
    for m in (model, get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))):
        assert backbone(m) is model.model
        with torch.no_grad(), capture_hidden_states(m) as captured:
            logits = m(input_ids=ids).logits
        torch.testing.assert_close(captured["hidden"] @ model.lm_head.weight.t(), logits, atol=1e-5, rtol=1e-5)
        assert not captured["hidden"].requires_grad
    # The hook is removed after the block
    with torch.no_grad():
        model(input_ids=ids)
    assert not model.model._forward_hooks
