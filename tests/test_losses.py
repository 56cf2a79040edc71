"""The token-loss family (`trl_onpolicy.losses`) against an independent float64 full-softmax recomputation.

Each loss is checked twice against references written here from the logits: its per-token value, and its gradient
w.r.t. the logits (autograd through a float64 log-softmax vs the closed forms of method.md).
"""

import math

import numpy as np
import pytest
import torch

from trl_onpolicy.losses import (
    centered_log_likelihood,
    idft_gamma,
    idft_schedule,
    token_loss,
    token_weights,
    topk_entropy_from_logits,
)

VOCAB = 256


def make_logits(n=120, vocab=VOCAB, seed=0):
    """Float64 logits and targets chosen so that phi covers both IDFT saturation regions and the band between them.

    A third of the rows are random with sharpness from flat to peaked and targets of any rank (phi from ~0 to very
    negative); a third have a moderately likely target over a flat remainder (over-confident: phi > ln 10); a third
    have the top-1 target of a random row (phi around 0).
    """
    g = torch.Generator().manual_seed(seed)
    kind = torch.arange(n) % 3
    scale = torch.logspace(-1, 1.2, n, dtype=torch.float64)[:, None]
    logits = torch.randn(n, vocab, generator=g, dtype=torch.float64) * scale
    targets = torch.randint(0, vocab, (n,), generator=g)
    flat = kind == 1
    logits[flat] = torch.randn(int(flat.sum()), vocab, generator=g, dtype=torch.float64) * 0.1
    share = torch.linspace(0.15, 0.7, int(flat.sum()), dtype=torch.float64)  # target probability ~ share
    logits[flat, targets[flat]] += torch.log(share / (1 - share) * (vocab - 1))
    top1 = kind == 2
    targets[top1] = logits[top1].argmax(-1)
    return logits, targets


def reference(kind, logits, targets, *, beta=1.0, gamma_min=0.1, gamma_max=2.0, schedule=1.0, k=20, eaft="topk"):
    """Per-token value and closed-form gradient of each loss, from the logits alone, in float64."""
    logits = logits.detach().double()
    p_all = torch.softmax(logits, -1)
    lp_all = torch.log_softmax(logits, -1)
    lp = lp_all.gather(-1, targets[:, None]).squeeze(-1)
    p = lp.exp()
    entropy = -(p_all * lp_all).sum(-1)
    phi = lp + entropy
    gamma = None
    if kind == "nll":
        w = torch.ones_like(p)
    elif kind == "dft":
        w = p
    elif kind == "eaft":
        if eaft == "topk":
            top = logits.sort(-1, descending=True).values[:, :k]
            q = torch.softmax(top, -1)
            w = -(q * q.log()).sum(-1) / math.log(k)
        else:
            w = entropy / math.log(logits.shape[-1])
    else:
        g_raw = torch.exp(-phi / beta).clamp(gamma_min, gamma_max)
        gamma = 1 + schedule * (g_raw - 1)
        w = p**gamma
    value = -w * lp
    one_hot = torch.nn.functional.one_hot(targets, logits.shape[-1]).double()
    # d(-log p_y)/dz = -(e_y - p); a detached weight just scales it
    grad = -w[:, None] * (one_hot - p_all)
    return {"value": value, "grad": grad, "phi": phi, "gamma": gamma, "weight": w, "p": p}


def family_loss(kind, logits, targets, detach="weight", **kw):
    """Runs the module under test on log p and H computed by autograd from float64 logits."""
    lp_all = torch.log_softmax(logits, -1)
    lp = lp_all.gather(-1, targets[:, None]).squeeze(-1)
    entropy = -(lp_all.exp() * lp_all).sum(-1)
    extra = {}
    if kind == "eaft":
        k = kw.pop("k", 20)
        if kw.pop("eaft", "topk") == "topk":
            extra = dict(eaft_entropy=topk_entropy_from_logits(logits.detach(), k), eaft_num_classes=k)
        else:
            extra = dict(eaft_entropy=entropy.detach(), eaft_num_classes=logits.shape[-1])
    return token_loss(kind, lp, entropy, detach=detach, **kw, **extra)


CASES = [
    ("nll", {}),
    ("dft", {}),
    ("eaft", {"eaft": "topk", "k": 20}),
    ("eaft", {"eaft": "topk", "k": 5}),
    ("eaft", {"eaft": "full"}),
    ("idft", {}),
    ("idft", {"beta": 0.5, "gamma_min": 0.3, "gamma_max": 1.5}),
    ("idft", {"beta": 2.0, "schedule": 0.3}),
    ("idft", {"schedule": 0.0}),
    ("idft", {"gamma_min": 1.0, "gamma_max": 1.0}),
    ("idft", {"gamma_min": 0.0, "gamma_max": 0.0}),
]


CASE_IDS = [f"{k}-{'-'.join(f'{a}={b}' for a, b in kw.items())}" for k, kw in CASES]


@pytest.mark.parametrize("kind,kw", CASES, ids=CASE_IDS)
def test_family_values_and_gradients_against_float64_reference(kind, kw):
    logits, targets = make_logits()
    logits.requires_grad_(True)
    per_token, stats = family_loss(kind, logits, targets, **dict(kw))
    ref = reference(kind, logits, targets, **kw)
    assert per_token.dtype == torch.float64
    torch.testing.assert_close(per_token.detach(), ref["value"], atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(stats["weight"], ref["weight"], atol=1e-12, rtol=1e-10)
    if kind == "idft":
        torch.testing.assert_close(stats["phi"], ref["phi"], atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(stats["gamma"], ref["gamma"], atol=1e-12, rtol=1e-10)
    per_token.sum().backward()
    torch.testing.assert_close(logits.grad, ref["grad"], atol=1e-12, rtol=1e-9)


def test_test_data_covers_every_idft_regime():
    logits, targets = make_logits()
    phi = reference("idft", logits, targets)["phi"]
    assert (phi <= -math.log(2)).sum() > 10  # gamma = gamma_max
    assert (phi >= math.log(10)).sum() > 10  # gamma = gamma_min
    assert ((phi > -math.log(2)) & (phi < math.log(10))).sum() > 10  # exp(-phi)


@pytest.mark.parametrize("schedule", [1.0, 0.4])
def test_idft_v1_gradient_changes_sign_below_exp_minus_one_over_gamma(schedule):
    """detach='gamma' (paper v1): grad = -p^gamma (1 + gamma log p) (e_y - p), which pushes targets with
    p < exp(-1/gamma) down; v2 (detach='weight') always pushes the target up."""
    logits, targets = make_logits(seed=1)
    ref = reference("idft", logits, targets, schedule=schedule)
    p, gamma = ref["p"], ref["gamma"]

    leaf = logits.clone().requires_grad_(True)
    per_token, stats = family_loss("idft", leaf, targets, detach="gamma", schedule=schedule)
    torch.testing.assert_close(per_token.detach(), ref["value"], atol=1e-12, rtol=1e-10)  # same value as v2
    per_token.sum().backward()
    one_hot = torch.nn.functional.one_hot(targets, VOCAB).double()
    expected = -(p**gamma * (1 + gamma * p.log()))[:, None] * (one_hot - torch.softmax(logits, -1))
    torch.testing.assert_close(leaf.grad, expected, atol=1e-12, rtol=1e-9)

    target_grad = leaf.grad.gather(-1, targets[:, None]).squeeze(-1)
    unlikely = p < torch.exp(-1 / gamma)
    assert unlikely.sum() > 5 and (~unlikely).sum() > 5
    assert (target_grad[unlikely] > 0).all()  # descent lowers the target's logit
    assert (target_grad[~unlikely] < 0).all()

    leaf_v2 = logits.clone().requires_grad_(True)
    family_loss("idft", leaf_v2, targets, detach="weight", schedule=schedule)[0].sum().backward()
    assert (leaf_v2.grad.gather(-1, targets[:, None]) < 0).all()


def test_special_cases_reduce_to_dft_and_nll():
    logits, targets = make_logits(seed=2)

    def value_and_grad(kind, **kw):
        leaf = logits.clone().requires_grad_(True)
        out = family_loss(kind, leaf, targets, **kw)[0]
        out.sum().backward()
        return out.detach(), leaf.grad

    dft, nll = value_and_grad("dft"), value_and_grad("nll")
    # gamma = 1 (fixed, or through schedule 0) is DFT; gamma = 0 is NLL; exactly, values and gradients
    torch.testing.assert_close(value_and_grad("idft", gamma_min=1.0, gamma_max=1.0), dft, atol=0, rtol=0)
    torch.testing.assert_close(value_and_grad("idft", schedule=0.0), dft, atol=0, rtol=0)
    for detach in ("weight", "gamma"):
        got = value_and_grad("idft", detach=detach, gamma_min=0.0, gamma_max=0.0)
        torch.testing.assert_close(got, nll, atol=0, rtol=0)
    # v1 at gamma = 1 has DFT's value but not its gradient (-p (1 + log p) (e_y - p))
    v1 = value_and_grad("idft", detach="gamma", gamma_min=1.0, gamma_max=1.0)
    torch.testing.assert_close(v1[0], dft[0], atol=0, rtol=0)
    assert (v1[1] - dft[1]).abs().max() > 1e-2
    # and the defaults really differ from both
    idft = value_and_grad("idft")
    assert (idft[0] - dft[0]).abs().max() > 1e-3 and (idft[0] - nll[0]).abs().max() > 1e-3


@pytest.mark.parametrize("beta", [1.0, 0.5, 3.0])
def test_gamma_saturation_points(beta):
    gamma_min, gamma_max = 0.1, 2.0
    lo, hi = -beta * math.log(gamma_max), beta * math.log(1 / gamma_min)  # -ln 2 and ln 10 for beta = 1
    phi = [-1e30, -50.0, lo - 1e-6, lo, lo + 1e-3, 0.0, hi - 1e-3, hi, hi + 1e-6, 50.0, 1e30]
    phi = torch.tensor(phi, dtype=torch.float64)
    gamma = idft_gamma(phi, beta, gamma_min, gamma_max)
    assert torch.isfinite(gamma).all()
    assert (gamma[:3] == gamma_max).all() and (gamma[-3:] == gamma_min).all()  # strictly beyond the saturation points
    assert gamma[3].item() == pytest.approx(gamma_max, rel=1e-12)  # at them
    assert gamma[7].item() == pytest.approx(gamma_min, rel=1e-12)
    assert gamma_min < gamma[4] < gamma_max and gamma_min < gamma[6] < gamma_max
    inner = torch.tensor([4, 5, 6])
    torch.testing.assert_close(gamma[inner], torch.exp(-phi[inner] / beta), rtol=1e-12, atol=0)
    assert gamma[5] == 1.0  # on-policy tokens get DFT's exponent
    # the schedule blends gamma towards 1 linearly
    for lam in (0.0, 0.25, 1.0):
        blended = idft_gamma(phi, beta, gamma_min, gamma_max, lam)
        torch.testing.assert_close(blended, 1 + lam * (gamma - 1), rtol=1e-12, atol=1e-15)


def reference_schedule(progress, warmup, transition):
    if progress is None:
        return 1.0
    if transition == 0:
        return float(progress >= warmup)
    return float(np.interp(progress, [warmup, warmup + transition], [0.0, 1.0]))


@pytest.mark.parametrize("warmup,transition", [(0.0, 0.0), (0.2, 0.1), (0.25, 0.5), (0.5, 0.0), (0.0, 1.0), (1.0, 0.0)])
def test_schedule_lambda(warmup, transition):
    for progress in [None, *np.linspace(0, 1, 41).tolist(), warmup, warmup + transition / 2, 1.0]:
        got = idft_schedule(progress, warmup, transition)
        assert got == pytest.approx(reference_schedule(progress, warmup, transition), abs=1e-12), progress
        assert 0.0 <= got <= 1.0


def test_centered_log_likelihood_is_detached_and_exact():
    logits, targets = make_logits(n=10, seed=3)
    logits.requires_grad_(True)
    lp_all = torch.log_softmax(logits, -1)
    lp = lp_all.gather(-1, targets[:, None]).squeeze(-1)
    h = -(lp_all.exp() * lp_all).sum(-1)
    phi = centered_log_likelihood(lp, h)
    assert not phi.requires_grad and phi.dtype == torch.float64
    torch.testing.assert_close(phi, reference("idft", logits, targets)["phi"], atol=1e-12, rtol=0)
    # float32 and bf16 inputs are computed in float32
    assert centered_log_likelihood(lp.float(), h.float()).dtype == torch.float32
    assert centered_log_likelihood(lp.bfloat16(), h.bfloat16()).dtype == torch.float32


@pytest.mark.parametrize("k", [2, 20, 47, 48, 100])
def test_topk_entropy_from_logits(k):
    logits, _ = make_logits(n=12, seed=4)
    got = topk_entropy_from_logits(logits, k)
    assert got.dtype == torch.float64
    kk = min(k, VOCAB)
    top = logits.sort(-1, descending=True).values[:, :kk]
    q = torch.softmax(top, -1)
    torch.testing.assert_close(got, -(q * q.log()).sum(-1), atol=1e-12, rtol=1e-12)
    assert (got <= math.log(kk) + 1e-12).all()
    assert topk_entropy_from_logits(logits.float(), k).dtype == torch.float32


@pytest.mark.parametrize("kind", ["nll", "dft", "eaft", "idft"])
@pytest.mark.parametrize("detach", ["weight", "gamma"])
def test_masked_and_extreme_tokens(kind, detach):
    """Positions TRL's fused head masks (log p = 0, H = 0) give exactly 0; extreme log-probs give finite losses."""
    lp = torch.tensor([0.0, -1e-8, -30.0, -1e4, -80.0], requires_grad=True)
    h = torch.tensor([0.0, 0.0, 1e-3, 5.0, 11.0])
    extra = dict(eaft_entropy=h, eaft_num_classes=20) if kind == "eaft" else {}
    per_token, stats = token_loss(kind, lp, h, detach=detach, **extra)
    assert per_token[0] == 0
    assert torch.isfinite(per_token).all()
    per_token.sum().backward()
    assert torch.isfinite(lp.grad).all()
    assert per_token.dtype == torch.float32 and per_token.requires_grad


def test_bf16_log_probs_keep_dtype_but_weight_in_float32():
    logits, targets = make_logits(n=16, seed=5)
    lp_all = torch.log_softmax(logits.float(), -1)
    lp = lp_all.gather(-1, targets[:, None]).squeeze(-1)
    h = -(lp_all.exp() * lp_all).sum(-1)
    per_token, stats = token_loss("idft", lp.bfloat16(), h.bfloat16())
    assert per_token.dtype == torch.bfloat16
    assert stats["weight"].dtype == torch.float32 and stats["gamma"].dtype == torch.float32


def test_bad_arguments():
    lp, h = torch.tensor([-1.0]), torch.tensor([1.0])
    with pytest.raises(ValueError, match="Unknown token loss 'sft'"):
        token_loss("sft", lp, h)
    with pytest.raises(ValueError, match="detach mode 'logits'"):
        token_loss("idft", lp, h, detach="logits")
    with pytest.raises(ValueError, match="eaft_entropy"):
        token_weights("eaft", lp, h)
    with pytest.raises(ValueError, match="entropy"):
        token_weights("idft", lp)
