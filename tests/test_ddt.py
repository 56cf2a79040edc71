"""DDT diagnostics: statistics against a float64 recomputation, on-policy calibration on a briefly trained tiny model,
TRL tokenization parity, CLI/API agreement, bad input, filtering, and a 2-process run."""

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset

from conftest import arithmetic_examples
from trl_onpolicy import score_dataset
from trl_onpolicy.ddt import (
    SKIP_REASONS,
    filter_dataset,
    sample_own_responses,
    sample_statistics,
    score_token_ids,
)
from trl_onpolicy.cli.ddt import filter_main, main
from trl_onpolicy.testing.tiny import make_tiny_model


def _train(model, tok, rows, steps=30, seed=0):
    """A few dozen AdamW steps on full sequences: enough to make the model far from uniform (a few seconds)."""
    seqs = [tok(r["prompt"] + r["completion"] + tok.eos_token)["input_ids"] for r in rows]
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), tok.pad_token_id)
    attn = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        attn[i, : len(s)] = 1
    labels = ids.masked_fill(attn == 0, -100)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        b = torch.randperm(len(seqs), generator=gen)[:16]
        model(input_ids=ids[b], attention_mask=attn[b], labels=labels[b]).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return model


@pytest.fixture(scope="module")
def trained(tiny_tokenizer, tmp_path_factory):
    """(model, tokenizer, saved folder) of a tiny model trained on plain arithmetic text for 30 steps."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ddt-trained")
    model, tok = make_tiny_model(tiny_tokenizer)
    tok.save_pretrained(path)  # the CLI reads it back from the folder (test_models_data: it reloads identically)
    _train(model, tok, arithmetic_examples(64, conversational=False))
    model.save_pretrained(path)
    return model, tok, path


def _reference_sample(model, ids, mask):
    """Float64 full-softmax phi, varentropy and z of one sequence's masked tokens (independent of the tiled code)."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    lp = logits.log_softmax(-1)[:-1]
    p = lp.exp()
    entropy = -(p * lp).sum(-1)
    varentropy = (p * (lp + entropy[:, None]) ** 2).sum(-1)
    targets = torch.tensor(ids[1:])
    phi = lp.gather(-1, targets[:, None]).squeeze(-1) + entropy
    keep = torch.tensor(mask[1:]).bool()
    phi, varentropy = phi[keep], varentropy[keep]
    return phi.numpy(), varentropy.numpy(), (phi.sum() / varentropy.sum().sqrt()).item()


# ---------------------------------------------------------------------------------------------------------------


def test_statistics_match_float64_full_softmax(tiny_tokenizer):
    # Qwen-style model with more output rows than tokenizer entries, and small tiles so that several are merged
    model, tok = make_tiny_model(tiny_tokenizer, extra_vocab=37, seed=3)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))  # peaked, non-uniform distributions
    rows = arithmetic_examples(6)
    result = score_dataset(model, tok, rows, vocab_chunk=100, token_chunk=7, batch_size=4, progress=False)
    from trl_onpolicy.ddt import Encoder

    enc = Encoder(tok, "prompt_completion")
    for row, record, arrays in zip(rows, result.samples, result.tokens):
        ids, mask = enc(row)
        phi, var, z = _reference_sample(model, ids, mask)
        np.testing.assert_allclose(arrays["phi"], phi, atol=2e-4, rtol=1e-4)
        np.testing.assert_allclose(arrays["varentropy"], var, atol=2e-4, rtol=1e-3)
        assert record["num_tokens"] == len(phi) == sum(mask[1:])
        assert record["z"] == pytest.approx(z, rel=1e-3, abs=1e-3)
        assert record["mean_phi"] == pytest.approx(phi.mean(), abs=1e-4)
        for t in (-1, -3, -5):
            assert record[f"frac_phi_gt_{t}"] == pytest.approx((phi > t).mean())
        worst = record["worst_tokens"]
        assert worst[0]["phi"] == pytest.approx(phi.min(), abs=2e-4)
        assert [w["phi"] for w in worst] == sorted(w["phi"] for w in worst)
    assert max(abs(v) for v in np.concatenate([a["phi"] for a in result.tokens])) > 0.5  # not a trivial model
    all_phi = np.concatenate([a["phi"] for a in result.tokens])
    assert result.summary["mean_phi"] == pytest.approx(all_phi.mean(), abs=1e-6)
    assert result.summary["std_phi"] == pytest.approx(all_phi.std(), abs=1e-6)
    assert sum(result.summary["phi_histogram"]["counts"]) == len(all_phi)


@pytest.mark.parametrize("transform", [{}, {"logit_scale": 0.7, "softcap": 50.0, "temperature": 0.8}])
def test_scoring_head_statistics_against_float64(transform):
    """The LM-head statistics DDT scores with (`trl_onpolicy.ops.lm_head.token_statistics`), with small tiles and with the
    device's default tiles, against a float64 full softmax, including the model's logit transforms."""
    from trl_onpolicy.ops.lm_head import full_softmax_statistics, token_statistics

    gen = torch.Generator().manual_seed(0)
    n, vocab = 537, 4301  # more than one default CPU tile (512 x 2048) in both directions
    hidden = torch.randn(n, 16, generator=gen) * torch.linspace(0.1, 20.0, n)[:, None]  # flat to very peaked rows
    weight, bias = torch.randn(vocab, 16, generator=gen), torch.randn(vocab, generator=gen)
    targets = torch.randint(0, vocab, (n,), generator=gen)
    z = (hidden.double() @ weight.double().t() + bias.double()) * transform.get("logit_scale", 1.0)
    if "softcap" in transform:
        z = transform["softcap"] * torch.tanh(z / transform["softcap"])
    ref = full_softmax_statistics(z / transform.get("temperature", 1.0), targets)
    small = token_statistics(hidden, weight, targets, bias, vocab_chunk=64, token_chunk=10, **transform)
    default = token_statistics(hidden, weight, targets, bias, **transform)
    for key in ("log_probs", "entropy", "varentropy"):
        torch.testing.assert_close(small[key].double(), ref[key], atol=2e-4, rtol=1e-4)
        torch.testing.assert_close(default[key].double(), ref[key], atol=2e-4, rtol=1e-4)
        torch.testing.assert_close(small[key], default[key], atol=2e-4, rtol=1e-4)
    assert ref["entropy"].min() < 0.05 and ref["entropy"].max() > 3  # both regimes are covered


def test_sample_statistics_pure():
    phi, var = np.array([0.5, -1.5, -4.0, -6.0]), np.array([1.0, 2.0, 0.5, 0.5])
    s = sample_statistics(phi, var)
    assert s["sum_phi"] == pytest.approx(-11.0) and s["mean_phi"] == pytest.approx(-2.75)
    assert s["z"] == pytest.approx(-11.0 / 2.0)
    assert (s["frac_phi_gt_-1"], s["frac_phi_gt_-3"], s["frac_phi_gt_-5"]) == (0.25, 0.5, 0.75)
    assert math.isnan(sample_statistics(np.zeros(2), np.zeros(2))["z"])


def test_own_samples_centered_foreign_negative(trained):
    model, tok, _ = trained
    rows = arithmetic_examples(64, conversational=False)
    own = sample_own_responses(model, tok, rows, max_new_tokens=24, batch_size=32, seed=0, progress=False)
    assert [o["index"] for o in own] == list(range(len(rows)))
    scored = score_dataset(model, tok, [{"prompt_ids": o["prompt_ids"], "completion_ids": o["completion_ids"]} for o in own],
                           max_length=None, progress=False)
    s = scored.summary
    assert s["num_tokens"] > 500
    assert s["mean_entropy"] > 0.2  # the model is not deterministic, so the test has power
    # E[phi] = 0 for own samples; the martingale sum has variance sum(varentropy): z ~ N(0, 1)
    standard_error = math.sqrt(s["mean_varentropy"] / s["num_tokens"])
    assert abs(s["mean_phi"]) < 4 * standard_error, (s["mean_phi"], standard_error)
    assert abs(s["corpus_z"]) < 4

    # foreign responses: the completion's tokens shuffled, and an unrelated sentence
    rng = random.Random(0)

    def shuffled(text):
        ids = tok(text)["input_ids"]
        rng.shuffle(ids)
        return tok.decode(ids)

    token_shuffled = [{"prompt": r["prompt"], "completion": shuffled(r["completion"])} for r in rows]
    foreign = [{"prompt": r["prompt"], "completion": "The quick brown fox jumps over the lazy dog."} for r in rows]
    for data in (token_shuffled, foreign):
        f = score_dataset(model, tok, data, progress=False).summary
        assert f["mean_phi"] < -1.0 and f["corpus_z"] < -20
        assert f["frac_phi_gt_-1"] < s["frac_phi_gt_-1"]


def _trl_prepared(tok, rows, assistant_only_loss=False):
    from trl import SFTConfig, SFTTrainer

    model, _ = make_tiny_model(tok)
    args = SFTConfig(output_dir="/tmp/unused-ddt", use_cpu=True, bf16=False, report_to=[], max_length=None,
                     assistant_only_loss=assistant_only_loss, dataset_num_proc=None, shuffle_dataset=False)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
    return trainer.train_dataset


@pytest.mark.parametrize("fmt", ["conversational", "plain", "messages", "text"])
def test_tokenization_matches_sft_trainer(tiny_tokenizer, fmt):
    """The scored tokens are exactly the tokens SFTTrainer trains on (its labels != -100)."""
    from trl_onpolicy.ddt import Encoder, detect_format

    base = arithmetic_examples(4, conversational=fmt != "plain")
    if fmt == "messages":
        rows = [{"messages": r["prompt"] + r["completion"]} for r in base]
    elif fmt == "text":
        rows = [{"text": r["prompt"] + r["completion"]} for r in arithmetic_examples(4, conversational=False)]
    else:
        rows = base
    prepared = _trl_prepared(tiny_tokenizer, rows, assistant_only_loss=fmt == "messages")
    enc = Encoder(tiny_tokenizer, detect_format(list(rows[0])))
    for row, ref in zip(rows, prepared):
        ids, mask = enc(row)
        assert ids == ref["input_ids"]
        ref_mask = [int(label != -100) for label in ref["labels"]]
        assert mask[1:] == ref_mask[1:]  # position 0 has no context and is never scored


def test_messages_without_generation_markers(tiny_tokenizer):
    """Templates TRL cannot patch with {% generation %} markers: assistant turns found by incremental rendering give
    TRL's marker mask minus the end of the generation prompt (here the newline after ``<|im_start|>assistant``, which
    TRL's Qwen training template puts inside the generation block), on a two-turn conversation."""
    from trl_onpolicy.ddt import Encoder

    conv = {"messages": [
        {"role": "user", "content": "What is 1 + 2?"}, {"role": "assistant", "content": "1 + 2 = 3."},
        {"role": "user", "content": "And 2 + 2?"}, {"role": "assistant", "content": "2 + 2 = 4."},
    ]}
    markers = Encoder(tiny_tokenizer, "messages")
    assert markers._assistant_mode == "markers"
    incremental = Encoder(tiny_tokenizer, "messages")
    incremental._assistant_mode = "incremental"
    ids_a, mask_a = markers(conv)
    ids_b, mask_b = incremental(conv)
    assert ids_a == ids_b
    assert all(a >= b for a, b in zip(mask_a, mask_b)) and sum(mask_b) == sum(mask_a) - 2
    assert tiny_tokenizer.decode([t for t, a, b in zip(ids_a, mask_a, mask_b) if a and not b]).strip() == ""
    scored = tiny_tokenizer.decode([t for t, m in zip(ids_a, mask_a) if m])
    assert "1 + 2 = 3." in scored and "2 + 2 = 4." in scored and "What is" not in scored


def test_api_and_cli_agree(trained, tmp_path):
    model, tok, path = trained
    rows = arithmetic_examples(12)
    data = tmp_path / "data.jsonl"
    Dataset.from_list(rows).to_json(str(data), lines=True)
    api = score_dataset(model, tok, rows, batch_size=5, progress=False)
    out = tmp_path / "out"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model_name_or_path: {path}\ndataset_name: {data}\nbatch_size: 3\n")
    assert main(["--config", str(recipe), "--output_dir", str(out), "--compare_self_samples",
                 "--max_new_tokens", "8", "--no_progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    for key in ("mean_phi", "std_phi", "mean_z", "frac_phi_gt_-1", "frac_phi_gt_-3", "frac_phi_gt_-5"):
        assert summary[key] == pytest.approx(api.summary[key], abs=1e-5), key
    assert summary["num_tokens"] == api.summary["num_tokens"] and summary["num_samples"] == len(rows)
    assert summary["skipped"] == {}
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["index"] for s in samples] == list(range(len(rows)))
    assert [s["mean_phi"] for s in samples] == pytest.approx([s["mean_phi"] for s in api.samples], abs=1e-5)
    own = summary["self_samples"]
    assert own["num_samples"] == len(rows) and own["num_tokens"] > 0
    assert (out / "self_samples.jsonl").exists()
    assert (out / "phi.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_resumes_from_finished_chunks(trained, tmp_path, monkeypatch):
    """An interrupted run resumes: finished row chunks are read back from the cache (NumPy .npz, no pickle), only
    missing ones are scored."""
    import trl_onpolicy.ddt as ddt_module

    model, tok, path = trained
    data = tmp_path / "data.jsonl"
    Dataset.from_list(arithmetic_examples(10, conversational=False)).to_json(str(data), lines=True)
    argv = ["--model_name_or_path", str(path), "--dataset_name", str(data), "--output_dir", str(tmp_path / "out"),
            "--resume_chunk_rows", "4", "--no_progress"]
    assert main(argv) == 0
    first = json.loads((tmp_path / "out" / "summary.json").read_text())
    cache = tmp_path / "out" / ".ddt_cache"
    assert sorted(p.name for p in cache.glob("corpus-*")) == ["corpus-00000.npz", "corpus-00001.npz", "corpus-00002.npz"]
    assert not list(cache.glob("*.pkl"))
    (cache / "corpus-00001.npz").unlink()  # as if the run had stopped during the second chunk
    calls = []
    original = ddt_module.score_dataset
    monkeypatch.setattr(ddt_module, "score_dataset", lambda *a, **k: calls.append(len(a[2])) or original(*a, **k))
    assert main(argv) == 0
    assert calls == [4]  # only the missing chunk (rows 4..7) was scored again
    again = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert again["mean_phi"] == pytest.approx(first["mean_phi"], abs=1e-6) and again["num_tokens"] == first["num_tokens"]
    # a chunk is an .npz read with allow_pickle=False: a planted object array is refused, never unpickled
    np.savez(cache / "corpus-00000.npz", __json__=np.array([{"planted": 1}], dtype=object))
    with pytest.raises(ValueError, match="unreadable"):
        main(argv)


def test_ddt_cache_is_recomputed_when_data_weights_or_settings_change(trained, tmp_path, monkeypatch, capsys):
    """The cache is keyed by content, not by the command line: the same paths with other rows or other weights, or
    another setting, recompute every chunk (and report what changed); the numbers match a fresh run."""
    import shutil

    import trl_onpolicy.ddt as ddt_module

    _, _, path = trained
    model_dir = tmp_path / "model"
    shutil.copytree(path, model_dir)
    data = tmp_path / "data.jsonl"
    rows = arithmetic_examples(8, conversational=False)
    Dataset.from_list(rows).to_json(str(data), lines=True)
    argv = ["--model_name_or_path", str(model_dir), "--dataset_name", str(data), "--output_dir", str(tmp_path / "out"),
            "--resume_chunk_rows", "4", "--no_progress"]
    calls = []
    original = ddt_module.score_dataset
    monkeypatch.setattr(ddt_module, "score_dataset", lambda *a, **k: calls.append(len(a[2])) or original(*a, **k))

    def run(args=argv):
        calls.clear()
        assert main(args) == 0
        return json.loads((tmp_path / "out" / "summary.json").read_text())

    base = run()
    assert run()["mean_phi"] == base["mean_phi"] and calls == []  # unchanged: everything from the cache
    # 1. the data changed at the same path
    Dataset.from_list(rows[:4] + arithmetic_examples(12, conversational=False)[8:12]).to_json(str(data), lines=True)
    changed = run()
    assert calls == [4, 4] and "different data" in capsys.readouterr().out
    assert changed["mean_phi"] != pytest.approx(base["mean_phi"], abs=1e-6)
    fresh_argv = [a if a != str(tmp_path / "out") else str(tmp_path / "fresh") for a in argv]
    assert main(fresh_argv) == 0
    assert json.loads((tmp_path / "fresh" / "summary.json").read_text())["mean_phi"] == pytest.approx(changed["mean_phi"], abs=1e-9)
    # 2. the weights changed at the same path
    model = __import__("transformers").AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        model.lm_head.weight.mul_(1.5) if not model.config.tie_word_embeddings else model.get_input_embeddings().weight.mul_(1.5)
    model.save_pretrained(model_dir)
    reweighted = run()
    assert calls == [4, 4] and "different model" in capsys.readouterr().out
    assert reweighted["mean_phi"] != pytest.approx(changed["mean_phi"], abs=1e-6)
    # 3. a setting that changes the result
    run(argv + ["--max_length", "500"])
    assert calls == [4, 4] and "different settings" in capsys.readouterr().out


def test_bad_input(tiny_tokenizer):
    model, tok = make_tiny_model(tiny_tokenizer)
    with pytest.raises(ValueError, match="Accepted formats"):
        score_dataset(model, tok, [{"question": "a", "answer": "b"}], progress=False)
    with pytest.raises(ValueError, match="lacks \\['completion'\\]"):
        score_dataset(model, tok, [{"prompt": "a"}], progress=False)

    rows = arithmetic_examples(3, conversational=False)
    rows.append({"prompt": "What is 1 + 1? ", "completion": ""})  # empty completion
    rows.append({"prompt": "What is 1 + 1? ", "completion": " 2" * 300})  # longer than max_length
    rows.append({"prompt": None, "completion": "2"})  # invalid row
    result = score_dataset(model, tok, rows, max_length=64, progress=False)
    assert result.summary["skipped"] == {"empty_completion": 1, "too_long": 1, "invalid_row": 1}
    assert result.summary["num_samples"] == 3 and result.summary["num_rows"] == 6
    assert [s["skipped"] for s in result.samples[3:]] == ["empty_completion", "too_long", "invalid_row"]
    assert set(result.summary["skipped"]) <= set(SKIP_REASONS)

    conv = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}]
    assert score_dataset(model, tok, conv, progress=False).summary["skipped"] == {"empty_completion": 1}

    import copy

    tok_plain = copy.deepcopy(tok)
    tok_plain.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        score_dataset(model, tok_plain, arithmetic_examples(2), progress=False)
    with pytest.raises(ValueError, match="no chat template"):
        score_dataset(model, tok_plain, [{"messages": arithmetic_examples(1)[0]["prompt"]}], progress=False)

    # token ids that do not fit the model: a tokenizer larger than the model's vocabulary is refused ...
    small = make_tiny_model(tok, extra_vocab=-10)[0]
    with pytest.raises(ValueError, match="do not fit"):
        score_dataset(small, tok, arithmetic_examples(2), progress=False)
    # ... a model vocabulary larger than the tokenizer is fine ...
    big = make_tiny_model(tok, extra_vocab=64)[0]
    assert score_dataset(big, tok, arithmetic_examples(2), progress=False).summary["num_samples"] == 2
    # ... and pre-tokenized ids outside the model's vocabulary are counted
    pre = [{"prompt_ids": [1, 2, 3], "completion_ids": [4, 5]}, {"prompt_ids": [1, 2], "completion_ids": [4, len(tok) + 64]},
           {"prompt_ids": [1], "completion_ids": []}, {"prompt_ids": [1], "completion_ids": [-3]}]
    s = score_dataset(big, tok, pre, progress=False).summary
    assert s["skipped"] == {"token_out_of_vocab": 2, "empty_completion": 1} and s["num_samples"] == 1


def test_score_token_ids_order_and_batching(trained):
    model, tok, _ = trained
    seqs = [tok(r["prompt"] + r["completion"])["input_ids"] for r in arithmetic_examples(7, conversational=False)]
    seqs[3] = seqs[3] + seqs[3]  # different lengths, so sorting changes the order
    masks = [[1] * len(s) for s in seqs]
    one = score_token_ids(model, seqs, masks, batch_size=1)
    many = score_token_ids(model, seqs, masks, batch_size=4, max_tokens_per_batch=60)
    for a, b, s in zip(one, many, seqs):
        assert len(a["phi"]) == len(s) - 1
        np.testing.assert_allclose(a["phi"], b["phi"], atol=1e-4)
        assert list(a["token_ids"]) == s[1:]


def test_filtering(trained, tmp_path):
    model, tok, path = trained
    rows = arithmetic_examples(10, conversational=False)
    rows += [{"prompt": r["prompt"], "completion": "The quick brown fox jumps over the lazy dog."} for r in rows[:5]]
    rows.append({"prompt": "What is 2 + 2? ", "completion": ""})
    data = Dataset.from_list(rows)
    result = score_dataset(model, tok, data, progress=False)
    means = [s.get("mean_phi") for s in result.samples]
    threshold = -1.0
    expected = [m is not None and m >= threshold for m in means]
    kept, report = filter_dataset(data, result, by="mean_phi", min_value=threshold)
    assert report["kept"] == sum(expected) == len(kept) and report["dropped"] == len(rows) - sum(expected)
    assert report["dropped_unscored"] == 1
    assert 0 < report["kept"] < len(rows) - 1  # the foreign rows are dropped, the in-distribution ones kept
    assert kept.column_names == data.column_names
    assert [r["completion"] for r in kept] == [r["completion"] for r, e in zip(rows, expected) if e]
    inverted, rep2 = filter_dataset(data, result, by="mean_phi", min_value=threshold, invert=True)
    assert rep2["kept"] == len(rows) - report["kept"] - 1
    _, rep3 = filter_dataset(data, result, by="z", max_value=0.0, keep_unscored=True)
    assert rep3["kept"] == sum(1 for s in result.samples if s["skipped"] or s["z"] <= 0)
    with pytest.raises(ValueError, match="Cannot filter by"):
        filter_dataset(data, result, by="phi", min_value=0)
    with pytest.raises(ValueError, match="cover"):
        filter_dataset(data.select(range(5)), result, min_value=0)

    # the CLI: score with `ddt`, filter with its samples.jsonl, same format (jsonl) and columns
    src = tmp_path / "data.jsonl"
    data.to_json(str(src), lines=True)
    assert main(["--model_name_or_path", str(path), "--dataset_name", str(src), "--output_dir", str(tmp_path / "s"),
                 "--no_progress"]) == 0
    assert filter_main(["--dataset_name", str(src), "--scores_file", str(tmp_path / "s" / "samples.jsonl"),
                        "--filter_by", "mean_phi", "--min_value", str(threshold), "--output_dir", str(tmp_path / "f")]) == 0
    report_cli = json.loads((tmp_path / "f" / "filter_report.json").read_text())
    assert (report_cli["kept"], report_cli["dropped"]) == (report["kept"], report["dropped"])
    out_rows = [json.loads(line) for line in (tmp_path / "f" / "filtered.jsonl").read_text().splitlines()]
    assert out_rows == [dict(r) for r in kept]
    # the same number of rows with other content: the scores (fingerprinted in summary.json) do not apply
    changed = data.to_list()
    changed[0] = dict(changed[0], completion=changed[1]["completion"])
    Dataset.from_list(changed).to_json(str(src), lines=True)
    with pytest.raises(ValueError, match="different data"):
        filter_main(["--dataset_name", str(src), "--scores_file", str(tmp_path / "s" / "samples.jsonl"),
                     "--min_value", str(threshold), "--output_dir", str(tmp_path / "f2")])
    assert not (tmp_path / "f2").exists()


@pytest.mark.slow
def test_two_processes_match_one(trained, tmp_path):
    """`accelerate launch` with 2 CPU processes (the shipped DDP config, gloo) splits the rows and gathers the same
    results as one process (torchrun is exercised by the realign and online tests)."""
    from conftest import free_port

    model, tok, path = trained
    rows = arithmetic_examples(9)
    data = tmp_path / "data.jsonl"
    Dataset.from_list(rows).to_json(str(data), lines=True)
    api = score_dataset(model, tok, rows, progress=False)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    root = Path(__file__).parent.parent
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file",
           str(root / "recipes" / "accelerate" / "cpu_ddp_2proc.yaml"), "--main_process_port", str(free_port()),
           "-m", "trl_onpolicy.cli.ddt", "--model_name_or_path", str(path), "--dataset_name", str(data),
           "--output_dir", str(tmp_path / "out"), "--device", "cpu", "--no_progress",
           "--compare_self_samples", "--max_new_tokens", "4"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=Path(__file__).parent.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["num_processes"] == 2  # really data-parallel, not one process (accelerate's silent fallback)
    assert summary["num_samples"] == len(rows) and summary["num_tokens"] == api.summary["num_tokens"]
    assert summary["mean_phi"] == pytest.approx(api.summary["mean_phi"], abs=1e-5)
    samples = [json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert [s["mean_phi"] for s in samples] == pytest.approx([s["mean_phi"] for s in api.samples], abs=1e-5)
    own = [json.loads(line) for line in (tmp_path / "out" / "self_samples.jsonl").read_text().splitlines()]
    assert [s["index"] for s in own] == list(range(len(rows)))  # own responses of both processes, gathered in order
    assert summary["self_samples"]["num_samples"] == len(rows)


def test_public_names_of_the_former_single_module_still_import():
    """``trl_onpolicy.ddt`` was one module before it was split into statistics / encoding / scoring / filter / plot:
    every public name it had is still an attribute of the package, the same object as in its new module."""
    import trl_onpolicy.ddt as ddt
    from trl_onpolicy.ddt import encoding, filter, plot, scoring, statistics

    former = ["THRESHOLDS", "PHI_QUANTILES", "HIST_RANGE", "HIST_BINS", "SKIP_REASONS", "FORMATS", "frac_key",
              "SkipSample", "sample_statistics", "histogram", "corpus_summary", "detect_format", "Encoder",
              "output_vocab_size", "check_tokenizer_fits", "check_some_row_scores", "score_token_ids", "worst_tokens",
              "DDTResult", "score_dataset", "sample_own_responses", "FILTER_STATISTICS", "filter_mask",
              "filter_dataset", "plot_phi_distribution"]
    homes = (statistics, encoding, scoring, filter, plot)
    for name in former:
        assert any(getattr(m, name, None) is getattr(ddt, name) for m in homes), name
    assert set(former) <= set(ddt.__all__)


@pytest.mark.parametrize("fmt", ["conversational", "plain", "messages"])
def test_own_sample_prompts_are_the_scored_prompts(tiny_tokenizer, fmt):
    """`Encoder.prompt_ids` (the prompts the model's own responses are sampled after; rendered by
    `trl_onpolicy.data.prompts.render_prompt_ids`) are the tokens before the first scored token of the same row, as
    tokenized for scoring, i.e. as SFTTrainer tokenizes it (up to the newline that TRL's generation markers score)."""
    from trl_onpolicy.ddt import Encoder, detect_format

    rows = arithmetic_examples(3, conversational=fmt != "plain")
    if fmt == "messages":
        rows = [{"messages": [{"role": "system", "content": "Be brief."}, *r["prompt"], *r["completion"]]} for r in rows]
    enc = Encoder(tiny_tokenizer, detect_format(list(rows[0])))
    for row in rows:
        ids, mask = enc(row)
        prompt = enc.prompt_ids(row)
        first = mask.index(1)
        assert prompt[:first] == ids[:first] and len(prompt) >= first
        assert tiny_tokenizer.decode(prompt[first:]).strip() == ""  # at most the generation prompt's newline
        if fmt == "messages":
            assert "Be brief." in tiny_tokenizer.decode(prompt)
