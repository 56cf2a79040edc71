"""Hinted Decoding: the batched, KV-cached generator against the authors' per-token, no-cache algorithm."""

import copy
import math

import pytest
import torch

from trl_onpolicy import hinted_decode
from trl_onpolicy.hinted.decoding import select_tokens, top_p_filter
from trl_onpolicy.testing.tiny import make_tiny_model

HINTED_TEXTS = [
    "Question: what is 12 + 7? Reference: 12 + 7 = 19. Explain it in your own words.",
    "Tom has 3 apples and buys 4 more.",
    "A train travels 60 miles per hour for 2 hours, so it covers 120 miles. Rewrite step by step, please.",
    "The quick",
    "Let's think step by step: 5 + 6 = 11.",
]
PLAIN_TEXTS = ["what is 12 + 7?", "Tom has 3 apples", "A train", "The quick brown fox jumps over the lazy dog.", "5 + 6"]


def peaked_model(tokenizer, extra_vocab=16, seed=0, arch="qwen2"):
    """A tiny float32 model whose next-token distributions range from peaked to flat (a random model with the
    default init is almost uniform, which would make lambda 1 everywhere and the test toothless)."""
    if arch == "qwen2":
        model, _ = make_tiny_model(tokenizer, extra_vocab=extra_vocab, seed=seed)
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(seed)
        config = LlamaConfig(vocab_size=len(tokenizer) + extra_vocab, hidden_size=48, intermediate_size=96,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
        model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(30.0)
    return model.float().eval()


def encode(tokenizer, texts):
    return [tokenizer(t)["input_ids"] for t in texts]


def reference_lambda(hn, mode, beta, center, h1, h2):
    if mode == "linear":
        return min(max(beta * hn, 0.0), 1.0)
    if mode == "sigmoid":
        return 1.0 / (1.0 + math.exp(-beta * (hn - center)))
    if hn <= h1:
        return 0.0
    if hn >= h2:
        return 1.0
    return (hn - h1) / (h2 - h1)


def reference_decode(model, tokenizer, hinted, plain, *, mode="linear", beta=3.0, center=0.5, h1=0.1, h2=0.4,
                     splitter=None, max_new_tokens=40, eos_ids=(), window=4, count=3, temperature=0.0, top_p=1.0,
                     seed=None):
    """The authors' loop: one sample, both prefixes recomputed in full at every token (no KV cache, no padding),
    lambda from the hinted stream's entropy / ln V with V = logits.shape[-1], the repetition rule recounted over the
    whole output and the splitter searched in the whole decoded output at every token. Greedy by default; with a
    temperature, one draw per token from the sample's own generator (seeded ``seed``) through `select_tokens`."""
    gen, lambdas, split, reason = [], [], False, "length"
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    for step in range(max_new_tokens):
        with torch.no_grad():
            zp = model(torch.tensor([hinted + gen]), use_cache=False).logits[0, -1].float()
            zq = model(torch.tensor([plain + gen]), use_cache=False).logits[0, -1].float()
        log_p, log_q = torch.log_softmax(zp, -1), torch.log_softmax(zq, -1)
        hn = float(-(log_p.exp() * log_p).sum()) / math.log(zp.shape[-1])
        if step == 0:
            lam = 0.0
        elif split:
            lam = 1.0
        else:
            lam = reference_lambda(hn, mode, beta, center, h1, h2)
        log_m = (1 - lam) * log_p + lam * log_q
        log_m = log_m - torch.logsumexp(log_m, -1)
        if temperature == 0:
            token = int(torch.argmax(log_m))
        else:
            token = int(select_tokens(log_m[None], temperature=temperature, top_p=top_p, generators=generator)[0])
        gen.append(token)
        lambdas.append(lam)
        if token in eos_ids:
            reason = "eos"
            break
        tail = gen[-window:]
        if window is not None and len(gen) >= window and sum(gen[i : i + window] == tail for i in range(len(gen) - window + 1)) >= count:
            reason = "repetition"
            break
        if splitter is not None and not split and splitter in tokenizer.decode(gen):
            split = True
    return gen, reason, lambdas


@pytest.fixture(scope="module")
def setup(tiny_tokenizer):
    model = peaked_model(tiny_tokenizer)
    return model, tiny_tokenizer, encode(tiny_tokenizer, HINTED_TEXTS), encode(tiny_tokenizer, PLAIN_TEXTS)


def pick_eos_and_splitter(model, tok, hinted, plain):
    """Choose an EOS id and a splitter string from the model's own greedy output, so both really occur."""
    free = hinted_decode(model, tok, hinted, plain, temperature=0, max_new_tokens=40, eos_token_ids=[],
                         repetition_window=4, repetition_count=3)
    eos = free[2].token_ids[6]
    splitter = None
    for t in free[0].token_ids[2:]:
        text = tok.decode([t])
        if text.strip() and t != eos:
            splitter = text.strip()
            break
    assert splitter is not None
    return eos, splitter


@pytest.mark.parametrize(
    "mode,kwargs",
    [("linear", dict(beta=3.0)), ("sigmoid", dict(beta=12.0, lambda_center=0.2)),
     ("piecewise", dict(lambda_h1=0.1, lambda_h2=0.3))],
)
def test_batched_matches_no_cache_reference(setup, mode, kwargs):
    model, tok, hinted, plain = setup
    eos, splitter = pick_eos_and_splitter(model, tok, hinted, plain)
    # the model's EOS is a list here: generation_config.eos_token_id may hold several ids
    model.generation_config.eos_token_id = [tok.eos_token_id, eos]
    try:
        results = hinted_decode(model, tok, hinted, plain, lambda_mode=mode, splitter=splitter, temperature=0,
                                max_new_tokens=40, repetition_window=4, repetition_count=3, return_lambdas=True,
                                **kwargs)
    finally:
        model.generation_config.eos_token_id = tok.eos_token_id
    ref_kwargs = dict(mode=mode, beta=kwargs.get("beta", 3.0), center=kwargs.get("lambda_center", 0.5),
                      h1=kwargs.get("lambda_h1", 0.1), h2=kwargs.get("lambda_h2", 0.4))
    reasons, mixed = set(), []
    for i, r in enumerate(results):
        gen, reason, lambdas = reference_decode(model, tok, hinted[i], plain[i], splitter=splitter,
                                                eos_ids=(tok.eos_token_id, eos), **ref_kwargs)
        assert r.token_ids == gen, f"sample {i}"
        assert r.finish_reason == reason, f"sample {i}"
        assert r.lambdas == pytest.approx(lambdas, abs=1e-4)
        reasons.add(reason)
        mixed += [lam for lam in lambdas if 0 < lam < 1]
    # the cases really exercise every stop, the splitter and the mixing regime
    assert reasons == {"eos", "length", "repetition"}
    split = [r for r in results if r.splitter_pos is not None and r.splitter_pos < len(r.token_ids)]
    assert split and all(all(lam == 1.0 for lam in r.lambdas[r.splitter_pos :]) for r in split)
    assert len(mixed) >= 5 and max(mixed) - min(mixed) > 0.3  # lambda really mixes, over a wide range


def test_llama_architecture_and_chunking(tiny_tokenizer):
    model = peaked_model(tiny_tokenizer, extra_vocab=0, seed=1, arch="llama")
    hinted, plain = encode(tiny_tokenizer, HINTED_TEXTS), encode(tiny_tokenizer, PLAIN_TEXTS)
    # chunks of 2 samples, and the joint prefill (hinted and plain rows padded together in one forward)
    results = hinted_decode(model, tiny_tokenizer, hinted, plain, temperature=0, max_new_tokens=24, batch_size=2,
                            repetition_window=4, repetition_count=3, prefill="joint")
    for i, r in enumerate(results):
        gen, reason, _ = reference_decode(model, tiny_tokenizer, hinted[i], plain[i], max_new_tokens=24,
                                          eos_ids=(tiny_tokenizer.eos_token_id,))
        assert (r.token_ids, r.finish_reason) == (gen, reason)


def test_first_token_comes_from_hinted_stream(setup):
    model, tok, hinted, plain = setup
    results = hinted_decode(model, tok, hinted, plain, beta=100.0, temperature=0, max_new_tokens=2,
                            return_lambdas=True)
    differs = 0
    for i, r in enumerate(results):
        with torch.no_grad():
            zp = model(torch.tensor([hinted[i]])).logits[0, -1]
            zq = model(torch.tensor([plain[i]])).logits[0, -1]
        assert r.token_ids[0] == int(zp.argmax())
        assert r.lambdas[0] == 0.0
        differs += int(zp.argmax() != zq.argmax())
    assert differs >= 2  # the rule is visible: the plain stream would have chosen another first token


def test_beta_zero_is_greedy_decoding_of_the_hinted_prompt(setup):
    model, tok, hinted, plain = setup
    results = hinted_decode(model, tok, hinted, plain, beta=0.0, temperature=0, max_new_tokens=20,
                            repetition_window=None)
    for i, r in enumerate(results):
        out = model.generate(torch.tensor([hinted[i]]), attention_mask=torch.ones(1, len(hinted[i]), dtype=torch.long),
                             do_sample=False, max_new_tokens=20, pad_token_id=tok.pad_token_id)
        expected = out[0, len(hinted[i]) :].tolist()
        assert r.token_ids == expected
        assert r.finish_reason == ("eos" if expected[-1] == tok.eos_token_id else "length")


def test_sampling_is_seeded_and_independent_of_batching(setup):
    model, tok, hinted, plain = setup
    kw = dict(temperature=1.0, top_p=0.9, max_new_tokens=15, repetition_window=None, repetition_count=None)
    a = hinted_decode(model, tok, hinted, plain, seed=7, **kw)
    b = hinted_decode(model, tok, hinted, plain, seed=7, batch_size=2, **kw)
    c = hinted_decode(model, tok, hinted, plain, seed=8, **kw)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert [r.token_ids for r in a] != [r.token_ids for r in c]
    # per-sample seeds: sample 3 alone with its seed reproduces its output in the batch
    alone = hinted_decode(model, tok, [hinted[3]], [plain[3]], seed=[7 + 3], **kw)
    assert alone[0].token_ids == a[3].token_ids
    # a shared torch.Generator reproduces too
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    d1 = hinted_decode(model, tok, hinted, plain, generator=g1, **kw)
    d2 = hinted_decode(model, tok, hinted, plain, generator=g2, **kw)
    assert [r.token_ids for r in d1] == [r.token_ids for r in d2]


def test_top_p_then_temperature_sampler_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.04, 0.01], dtype=torch.float64)
    log_m = probs.log().float()
    # nucleus at top_p=0.9 of the untempered mixture: {0, 1, 2}; then temperature 0.5 => p^2 renormalised
    kept = probs[:3] ** 2
    expected = torch.cat([kept / kept.sum(), torch.zeros(2, dtype=torch.float64)])
    assert torch.isinf(top_p_filter(log_m, 0.9)[3:]).all() and torch.isfinite(top_p_filter(log_m, 0.9)[:3]).all()
    n = 40000
    g = torch.Generator().manual_seed(0)
    draws = select_tokens(log_m.expand(n, -1), temperature=0.5, top_p=0.9, generators=g)
    freq = torch.bincount(draws, minlength=5).double() / n
    assert torch.allclose(freq, expected, atol=0.01)
    # HF's order (temperature first) keeps the nucleus of the tempered distribution, here {0, 1} only
    tempered = probs**2 / (probs**2).sum()
    assert tempered[0] < 0.9 <= tempered[:2].sum()  # so the tempered nucleus is {0, 1}
    draws = select_tokens(log_m.expand(n, -1), temperature=0.5, top_p=0.9, generators=g, order="temperature_first")
    freq = torch.bincount(draws, minlength=5).double() / n
    two = tempered[:2] / tempered[:2].sum()
    assert torch.allclose(freq, torch.cat([two, torch.zeros(3, dtype=torch.float64)]), atol=0.01)


def test_errors(tiny_tokenizer):
    tok = tiny_tokenizer
    model, _ = make_tiny_model(tok)
    h, p = encode(tok, HINTED_TEXTS[:2]), encode(tok, PLAIN_TEXTS[:2])
    bad = [
        (dict(hinted_input_ids=[h[0], []], plain_input_ids=p), "empty"),
        (dict(hinted_input_ids=h, plain_input_ids=p[:1]), "one of each"),
        (dict(hinted_input_ids=h, plain_input_ids=p, lambda_mode="cosine"), "lambda_mode"),
        (dict(hinted_input_ids=h, plain_input_ids=p, lambda_mode="piecewise", lambda_h1=0.5, lambda_h2=0.2), "lambda_h1 < lambda_h2"),
        (dict(hinted_input_ids=h, plain_input_ids=p, beta=-1.0), "beta"),
        (dict(hinted_input_ids=h, plain_input_ids=p, top_p=0.0), "top_p"),
        (dict(hinted_input_ids=h, plain_input_ids=p, temperature=-0.1), "temperature"),
        (dict(hinted_input_ids=h, plain_input_ids=p, max_new_tokens=0), "max_new_tokens"),
        (dict(hinted_input_ids=["some text", "more"], plain_input_ids=p), "tokenize"),
        (dict(hinted_input_ids=[h[0], [len(tok) + 5]], plain_input_ids=p), "outside the model's vocabulary"),
        (dict(hinted_input_ids=h, plain_input_ids=p, seed=[1]), "one seed per sample"),
    ]
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=message):
            hinted_decode(model, tok, **kwargs)
    small = make_tiny_model(tok)[0]
    small.resize_token_embeddings(len(tok) - 8)
    with pytest.raises(ValueError, match="do not fit"):
        hinted_decode(small, tok, h, p)
    # a model vocabulary larger than the tokenizer's (as in Qwen) is fine
    big, _ = make_tiny_model(tok, extra_vocab=32)
    assert len(hinted_decode(big, tok, h, p, max_new_tokens=3)) == 2


def test_mixture_and_repetition_helpers_against_plain_python():
    from trl_onpolicy.hinted.sampling import hinted_entropy, mix_log_probs, repetition_counts

    g = torch.Generator().manual_seed(0)
    z_p, z_q = torch.randn(3, 7, generator=g), torch.randn(3, 7, generator=g)
    z_p[0, 2] = float("-inf")  # a masked token in the hinted stream
    log_p, log_q = z_p.log_softmax(-1), z_q.log_softmax(-1)
    lam = torch.tensor([0.0, 0.3, 1.0])
    out = mix_log_probs(log_p, log_q, lam)
    assert not out.isnan().any() and torch.isneginf(out[0, 2])
    assert torch.allclose(out[0], log_p[0]) and torch.allclose(out[2], log_q[2])
    p, q = log_p[1].double().exp(), log_q[1].double().exp()
    m = p**0.7 * q**0.3
    assert torch.allclose(out[1].double(), (m / m.sum()).log(), atol=1e-6)
    hn = hinted_entropy(log_p)
    probs = log_p[0].double().exp()
    ref = -sum(float(x * math.log(x)) for x in probs if x > 0) / math.log(7)
    assert torch.isfinite(hn).all() and abs(float(hn[0]) - ref) < 1e-6

    seqs = torch.randint(0, 3, (20, 30), generator=g)
    seqs[0, 10:] = torch.tensor([1, 2, 0, 1] * 5)  # a loop of period 4
    for window in (1, 3, 5):
        counts = repetition_counts(seqs, window)
        for row, c in zip(seqs.tolist(), counts.tolist()):
            tail = row[-window:]
            assert c == sum(row[i : i + window] == tail for i in range(len(row) - window + 1))
    assert repetition_counts(seqs[:, :2], 3).eq(0).all()


def test_inverse_cdf_sampling_never_picks_impossible_tokens():
    from trl_onpolicy.hinted.decoding import inverse_cdf_sample

    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0], [0.0, 0.0, 1.0, 0.0, 0.0]])
    u = torch.tensor([0.0, 0.25, 0.4999, 0.5, 0.75, 1.0 - 2**-53], dtype=torch.float64)
    for row in probs:
        picks = inverse_cdf_sample(row.expand(len(u), -1), u)
        assert bool((row[picks] > 0).all())
    assert inverse_cdf_sample(probs[:1].expand(6, -1), u).tolist() == [1, 1, 1, 3, 3, 3]


class ScriptedModel(torch.nn.Module):
    """A causal LM whose output follows a script: after token ``a`` the logit of ``successors[a]`` gets a large
    bonus (at every position, so the cached and the no-cache forwards agree). Lets a test make a random model
    write a chosen text, e.g. a splitter made of several tokens or of the bytes of multi-byte characters."""

    def __init__(self, inner, successors: dict[int, int], strength: float = 500.0):
        super().__init__()
        self.inner = inner
        self.config, self.generation_config = inner.config, inner.generation_config
        vocab = inner.get_output_embeddings().weight.shape[0]
        bonus = torch.zeros(vocab, vocab)
        for a, b in successors.items():
            bonus[a, b] = strength
        self.register_buffer("bonus", bonus)

    def get_output_embeddings(self):
        return self.inner.get_output_embeddings()

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, use_cache=None, logits_to_keep=0,
                **kwargs):
        if cache is not None:  # older callers pass the cache as past_key_values, which stays in kwargs
            kwargs["cache"] = cache
        out = self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=use_cache, logits_to_keep=logits_to_keep, **kwargs)
        k = out.logits.shape[1]
        out.logits = out.logits + self.bonus[input_ids[:, -k:]]
        return out


SCRIPT = " so \\boxed{é→ 42}"  # 'é' is 2 bytes and '→' 3 bytes: byte tokens of the tiny byte-level tokenizer


def scripted_setup(tokenizer, hinted):
    script = tokenizer(SCRIPT)["input_ids"]
    assert len(set(script)) == len(script) and len(script) >= 10
    successors = dict(zip(script[:-1], script[1:]))
    for prompt in hinted:  # every hinted prompt starts the script
        assert prompt[-1] not in script
        successors[prompt[-1]] = script[0]
    return ScriptedModel(peaked_model(tokenizer), successors).eval(), script


def first_split(tokenizer, tokens, splitter):
    return next((t for t in range(1, len(tokens) + 1) if splitter in tokenizer.decode(tokens[:t])), None)


@pytest.mark.parametrize("splitter", ["\\boxed{", "é→", "→ 4"])
@pytest.mark.parametrize("temperature,seed", [(0.0, None), (1.0, 11)])
def test_multi_token_and_multi_byte_splitter_match_reference(tiny_tokenizer, splitter, temperature, seed):
    tok = tiny_tokenizer
    hinted, plain = encode(tok, HINTED_TEXTS), encode(tok, PLAIN_TEXTS)
    model, script = scripted_setup(tok, hinted)
    assert len(tok(splitter, add_special_tokens=False)["input_ids"]) >= 3  # the splitter spans several tokens
    results = hinted_decode(model, tok, hinted, plain, splitter=splitter, temperature=temperature, top_p=0.95,
                            seed=seed, max_new_tokens=24, eos_token_ids=[], repetition_window=4, repetition_count=3,
                            return_lambdas=True)
    for i, r in enumerate(results):
        gen, reason, lambdas = reference_decode(model, tok, hinted[i], plain[i], splitter=splitter, max_new_tokens=24,
                                                temperature=temperature, top_p=0.95,
                                                seed=None if seed is None else seed + i)
        assert (r.token_ids, r.finish_reason) == (gen, reason), f"sample {i}"
        assert r.lambdas == pytest.approx(lambdas, abs=1e-4)
        # the split is at the first token whose full decoded output holds the splitter, inside the script
        assert r.token_ids[: len(script)] == script
        assert r.splitter_pos == first_split(tok, r.token_ids, splitter) <= len(script)
        assert all(lam == 1.0 for lam in r.lambdas[r.splitter_pos :])


def test_sampled_decoding_with_repetition_stop_matches_reference(setup):
    model, tok, hinted, plain = setup
    kw = dict(temperature=1.0, top_p=0.9, max_new_tokens=40)
    reasons = set()
    for seed in (0, 5):
        results = hinted_decode(model, tok, hinted, plain, seed=seed, eos_token_ids=[tok.eos_token_id],
                                repetition_window=3, repetition_count=2, batch_size=3, **kw)
        for i, r in enumerate(results):
            gen, reason, _ = reference_decode(model, tok, hinted[i], plain[i], eos_ids=(tok.eos_token_id,), window=3,
                                              count=2, seed=seed + i, **kw)
            assert (r.token_ids, r.finish_reason) == (gen, reason), f"seed {seed} sample {i}"
            reasons.add(reason)
    assert "repetition" in reasons and "length" in reasons


def test_repetition_guard_equals_recount_including_hash_collisions():
    from trl_onpolicy.hinted.decoding import RepetitionGuard, repetition_counts

    class Colliding(RepetitionGuard):  # tiny moduli: different windows share hashes all the time
        _MOD = torch.tensor([7, 5])
        _BASE = torch.tensor([3, 2])

    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 4, (6, 60), generator=g)
    tokens[1, 20:] = torch.tensor([1, 2, 3] * 40)[:40]  # a loop of period 3
    tokens[2, 5:] = 2  # a loop of period 1
    for cls in (RepetitionGuard, Colliding):
        for window, count in ((1, 3), (3, 2), (4, 3), (8, 2)):
            guard = cls(6, window, count)
            samples = torch.arange(6)
            for step in range(60):
                fired = guard.update(tokens, samples, samples.tolist(), step)
                expected = repetition_counts(tokens[:, : step + 1], window) >= count
                assert fired.tolist() == expected.tolist(), (cls.__name__, window, count, step)


def splitter_streams(tokenizer, rng):
    """Token streams mixing random ids with encoded text holding multi-token and multi-byte splitters."""
    texts = ["We get \\boxed{12}.", "so é→ 4 and 答案 here", " → é", "\\boxed {", "x\\boxe d{\\boxed{"]
    vocab = len(tokenizer)
    for k in range(12):
        stream = []
        for _ in range(4):
            stream += [rng.randrange(vocab) for _ in range(rng.randrange(0, 5))]
            stream += tokenizer(texts[rng.randrange(len(texts))], add_special_tokens=False)["input_ids"]
        yield stream


@pytest.mark.parametrize("which", ["tiny", "smollm2"])
def test_splitter_watch_finds_the_same_first_step_as_a_full_decode(tiny_tokenizer, which, request):
    import random

    from trl_onpolicy.hinted.decoding import SplitterWatch

    tok = tiny_tokenizer if which == "tiny" else request.getfixturevalue("smollm2_tokenizer")
    rng = random.Random(0)
    checked = 0
    for splitter in ("\\boxed{", "é→", "答案", " →"):
        watch = SplitterWatch(tok, splitter)
        for stream in splitter_streams(tok, rng):
            tokens = torch.tensor([stream])
            found = next((t + 1 for t in range(len(stream))
                          if watch.may_end(tokens[0, t : t + 1])[0] and watch.hits(tokens, torch.tensor([0]), t)[0]), None)
            assert found == first_split(tok, stream, splitter), (splitter, stream)
            checked += found is not None
    assert checked >= 12


def test_decoder_uses_the_current_cache_argument(setup):
    model, tok, hinted, plain = setup
    seen = []
    handle = model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(set(kwargs)), with_kwargs=True)
    try:
        hinted_decode(model, tok, hinted, plain, max_new_tokens=4, temperature=0)
    finally:
        handle.remove()
    assert all("past_key_values" not in names for names in seen)
    assert sum("cache" in names for names in seen) == 3  # the three decode steps after the prefill


def _lm_head_shapes(model):
    """Shapes of the LM head's outputs, one per forward (captured with a forward hook on the output embedding)."""
    shapes = []
    handle = model.get_output_embeddings().register_forward_hook(lambda m, args, out: shapes.append(tuple(out.shape)))
    return shapes, handle


@pytest.mark.parametrize("prefill", ["separate", "joint"])
def test_prefill_keeps_last_position_logits_only_under_lora(setup, prefill):
    """A PEFT model's forward takes ``**kwargs``: logits_to_keep must still reach the base model, so the prefill
    computes [rows, 1, V] logits, never [rows, T, V]."""
    from peft import LoraConfig, get_peft_model

    model, tok, hinted, plain = setup
    lora = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    shapes, handle = _lm_head_shapes(lora)
    try:
        out = hinted_decode(lora, tok, hinted, plain, max_new_tokens=2, temperature=0, prefill=prefill)
    finally:
        handle.remove()
    b, v = len(hinted), lora.get_output_embeddings().weight.shape[0]
    # separate: one forward of the b hinted rows, one of the b plain rows; joint: one forward of 2b rows
    assert shapes[:2] == [(b, 1, v), (b, 1, v)] if prefill == "separate" else shapes[0] == (2 * b, 1, v)
    assert all(s[1] == 1 for s in shapes) and len(out) == b
    # the same tokens as the merged (plain) model, whose own forward declares logits_to_keep
    merged = lora.merge_and_unload()
    again = hinted_decode(merged, tok, hinted, plain, max_new_tokens=2, temperature=0, prefill=prefill)
    assert [r.token_ids for r in out] == [r.token_ids for r in again]


def test_prompts_longer_than_the_context_window_are_refused_up_front(tiny_tokenizer):
    tok = tiny_tokenizer
    model, _ = make_tiny_model(tok)
    model.config.max_position_embeddings = window = 64
    h, p = encode(tok, HINTED_TEXTS[:2]), encode(tok, PLAIN_TEXTS[:2])
    longest = max(len(x) for x in h)
    assert max(len(x) for x in p) < longest < window
    calls = []
    handle = model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError, match=r"hinted_input_ids\[\d\] has \d+ tokens.*context window of 64 "
                                             r"\(config.max_position_embeddings\)"):
            hinted_decode(model, tok, h, p, max_new_tokens=window - longest + 1)
    finally:
        handle.remove()
    assert calls == []  # refused before any forward
    # exactly filling the window is fine
    out = hinted_decode(model, tok, h, p, max_new_tokens=window - longest, eos_token_ids=[], repetition_window=None)
    assert max(r.num_tokens for r in out) == window - longest
