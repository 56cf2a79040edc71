"""KL(base || trained) and held-out NLL (trl_onpolicy.eval.forgetting) against independent references: a float64 loop over
positions on the full logits, and TRL's own SFT loss."""

import copy

import pytest
import torch

from trl_onpolicy.eval.forgetting import heldout_nll, kl_to_base, sample_base_responses

from conftest import word_problem_rows

SYSTEM = {"role": "system", "content": "You are a careful math tutor. End with #### and the number."}


def _prompts(n):
    return [[SYSTEM, {"role": "user", "content": f"Tom has {i + 1} apples and buys {2 * i + 3} more. How many?"}]
            for i in range(n)]


def _perturbed(model, scale=0.05, seed=1):
    other = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return other


def _naive_kl(base, model, tokenizer, prompts, responses):
    """Per-prompt sums of the exact KL at each response position: one unpadded sequence at a time, full logits from
    the models' own forward, float64 softmax, an explicit loop over positions."""
    out = []
    for prompt, resp in zip(prompts, responses):
        text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        p = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([p + list(resp)])
        with torch.no_grad():
            lb = base(input_ids=ids).logits[0].double()
            lm = model(input_ids=ids).logits[0].double()
        total = 0.0
        for t in range(len(resp)):
            pos = len(p) - 1 + t  # the logits at pos predict response token t
            a, b = lb[pos].log_softmax(-1), lm[pos].log_softmax(-1)
            total += float((a.exp() * (a - b)).sum())
        out.append(total)
    return out


def test_kl_to_base_matches_float64_loop(tiny_model):
    base, tok = tiny_model
    base.eval()
    trained = _perturbed(base).eval()
    prompts = _prompts(5)
    responses = sample_base_responses(base, tok, prompts, max_new_tokens=7, seed=3, batch_size=2, progress=False)
    assert any(len(r) > 1 for r in responses)
    # small batches and token chunks: padding across lengths and several LM-head chunks per batch
    got = kl_to_base(base, trained, tok, prompts, responses, batch_size=2, token_chunk=3, progress=False)
    want = _naive_kl(base, trained, tok, prompts, responses)
    counts = [len(r) for r in responses]
    assert got["num_tokens"] == sum(counts)
    assert got["kl"] == pytest.approx(sum(want) / sum(counts), rel=1e-4)
    for value, total, n in zip(got["per_prompt"], want, counts):
        assert value == pytest.approx(total / n, rel=1e-4, abs=1e-7)
    assert got["ci_low"] <= got["kl_prompt_mean"] <= got["ci_high"]
    assert got["kl"] > 1e-4  # the perturbation moved the model


def test_kl_of_a_model_to_itself_is_zero(tiny_model):
    base, tok = tiny_model
    prompts = _prompts(3)
    responses = sample_base_responses(base, tok, prompts, max_new_tokens=6, seed=0, batch_size=3, progress=False)
    got = kl_to_base(base, copy.deepcopy(base), tok, prompts, responses, batch_size=2, progress=False)
    assert abs(got["kl"]) < 1e-6
    moved = kl_to_base(base, _perturbed(base, scale=0.02), tok, prompts, responses, batch_size=2, progress=False)
    assert moved["kl"] > 100 * max(abs(got["kl"]), 1e-9)


def test_sample_base_responses_is_seeded_temperature_one(tiny_model):
    base, tok = tiny_model
    prompts = _prompts(4)
    a = sample_base_responses(base, tok, prompts, max_new_tokens=6, seed=0, batch_size=2, progress=False)
    b = sample_base_responses(base, tok, prompts, max_new_tokens=6, seed=0, batch_size=2, progress=False)
    c = sample_base_responses(base, tok, prompts, max_new_tokens=6, seed=1, batch_size=2, progress=False)
    assert a == b and a != c  # reproducible, and sampled rather than greedy
    assert all(1 <= len(r) <= 6 for r in a)
    with pytest.raises(ValueError, match="one response per prompt"):
        kl_to_base(base, base, tok, prompts, a[:2], progress=False)


def test_heldout_nll_equals_trl_sft_loss(tiny_model, tmp_path):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model, tok = tiny_model
    rows = [{"prompt": [SYSTEM] + r["prompt"], "completion": r["completion"]} for r in word_problem_rows(6)]
    got = heldout_nll(model, tok, rows, batch_size=4, progress=False)

    args = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=len(rows), bf16=False, use_cpu=True,
                     report_to="none", max_length=1024, dataloader_drop_last=False, shuffle_dataset=False)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)  # mean NLL over the batch's completion tokens
    n_completion = int((batch["labels"] != -100).sum()) if "labels" in batch else int(batch["completion_mask"].sum())
    assert got["num_tokens"] == n_completion
    assert got["nll"] == pytest.approx(float(loss), rel=1e-4)
    assert len(got["per_prompt"]) == len(rows) and got["ci_low"] <= got["nll_prompt_mean"] <= got["ci_high"]


def test_heldout_nll_refuses_rows_without_completion(tiny_model):
    model, tok = tiny_model
    with pytest.raises(ValueError, match="row 0 needs `prompt` and `completion`"):
        heldout_nll(model, tok, [{"prompt": "x"}], progress=False)


def test_cached_base_hidden_states_give_the_same_kl(tiny_model):
    from trl_onpolicy.eval.forgetting import base_hidden_states

    base, tok = tiny_model
    trained = _perturbed(base, scale=0.03)
    prompts = _prompts(5)
    responses = sample_base_responses(base, tok, prompts, max_new_tokens=6, seed=2, batch_size=5, progress=False)
    cache = base_hidden_states(base, tok, prompts, responses, batch_size=3, progress=False)
    assert [h.shape[0] for h in cache] == [len(r) for r in responses]
    plain = kl_to_base(base, trained, tok, prompts, responses, batch_size=2, progress=False)
    cached = kl_to_base(base, trained, tok, prompts, responses, batch_size=2, base_hidden=cache, progress=False)
    assert cached["kl"] == pytest.approx(plain["kl"], rel=1e-5)
    assert cached["per_prompt"] == pytest.approx(plain["per_prompt"], rel=1e-5)
    with pytest.raises(ValueError, match="base_hidden does not match"):
        kl_to_base(base, trained, tok, prompts, responses, base_hidden=cache[:-1], progress=False)
