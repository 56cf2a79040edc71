"""The Hinted-Decoding realign job: outputs, DDT scores, filters, resumption after a crash or a SIGKILL, CLI."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import free_port, word_problem_rows
import torch
from datasets import Dataset

from trl_onpolicy.hinted.decoding import hinted_decode
from trl_onpolicy.ops.lm_head import full_softmax_statistics
from trl_onpolicy.data.prompts import render_prompt_ids as prompt_ids
from trl_onpolicy.hinted.realign import (
    RealignConfig,
    build_hinted_prompt_ids,
    main,
    realign_dataset,
    resolve_checker,
    response_statistics,
)

REPO = Path(__file__).resolve().parents[1]


rows = word_problem_rows


def small_config(out, **kw):
    base = dict(output_dir=str(out), max_new_tokens=6, temperature=1.0, top_p=1.0, batch_size=3, shard_size=4,
                splitter=None, drop_unfinished=False, drop_incorrect=False, score_batch_size=4)
    base.update(kw)
    return RealignConfig(**base)


def read_shards(out):
    recs = []
    for path in sorted((Path(out) / "shards").glob("shard-*.jsonl")):
        recs += [json.loads(line) for line in path.read_text().splitlines()]
    return recs


def test_realign_outputs_match_generator_and_float64_ddt(tiny_model, tmp_path):
    model, tok = tiny_model
    data = Dataset.from_list(rows(10))
    config = small_config(tmp_path / "out", seed=7, own_samples=True)
    summary = realign_dataset(model, tok, data, config, progress=False)

    recs = read_shards(tmp_path / "out")
    assert sorted(r["index"] for r in recs) == list(range(10))
    assert len(list((tmp_path / "out" / "shards").glob("*.jsonl"))) == 3  # ceil(10 / 4)
    assert summary["num_samples"] == 10 and summary["num_kept"] == 10
    kept = [json.loads(line) for line in (tmp_path / "out" / "train.jsonl").read_text().splitlines()]
    assert [r["index"] for r in kept] == list(range(10))
    # TRL conversational prompt-completion format, loadable as a dataset
    loaded = Dataset.from_list(kept)
    assert loaded[0]["prompt"] == rows(10)[0]["prompt"]
    assert loaded[0]["completion"][0]["role"] == "assistant"

    # each response is exactly what the generator gives for that row's seed (seed + row index), whatever the batching
    ex = rows(10)[5]
    plain = prompt_ids(tok, ex["prompt"])
    hinted, _ = build_hinted_prompt_ids(model, tok, [ex["question"]], [ex["solution"]])
    direct = hinted_decode(model, tok, hinted, [plain], max_new_tokens=6, temperature=1.0, top_p=1.0, seed=7 + 5)[0]
    rec = recs[[r["index"] for r in recs].index(5)]
    assert rec["finish_reason"] == direct.finish_reason
    assert rec["num_tokens"] == len(direct.token_ids)
    eos = tok.eos_token_id
    text_ids = direct.token_ids[:-1] if direct.token_ids and direct.token_ids[-1] == eos else direct.token_ids
    assert rec["completion"][0]["content"] == tok.decode(text_ids)

    # DDT statistics under the plain prompt against a float64 full-softmax recomputation from the model's logits
    ids = torch.tensor([plain + direct.token_ids])
    with torch.no_grad():
        logits = model(ids).logits[0, len(plain) - 1 : -1]
    ref = full_softmax_statistics(logits, torch.tensor(direct.token_ids))
    phi = ref["log_probs"] + ref["entropy"]
    assert rec["mean_phi"] == pytest.approx(phi.mean().item(), abs=1e-4)
    assert rec["z"] == pytest.approx((phi.sum() / ref["varentropy"].sum().sqrt()).item(), rel=1e-3)
    assert rec["frac_phi_gt_-1"] == pytest.approx((phi > -1).double().mean().item())
    # the reference solution is scored too, and the summary averages the records
    assert summary["realigned"]["mean_phi"] == pytest.approx(sum(r["mean_phi"] for r in recs) / 10)
    assert "mean_phi" in summary["reference"] and summary["reference"]["accuracy"] == 1.0
    # the model's own samples: scored the same way, and their average is in the summary
    own = [r for r in recs if r["own_num_tokens"]]
    assert own and summary["own"]["mean_phi"] == pytest.approx(sum(r["own_mean_phi"] for r in recs) / 10)


def test_filters_and_counts(tiny_model, tmp_path):
    model, tok = tiny_model
    data = Dataset.from_list(rows(8))
    calls = []

    def checker(extracted, gold):  # accept every other sample, deterministically by call order
        calls.append(gold)
        return len(calls) % 2 == 1

    config = small_config(tmp_path / "out", drop_unfinished=True, drop_incorrect=True, min_mean_phi=-1.5,
                          score_reference=False, max_new_tokens=4)
    summary = realign_dataset(model, tok, data, config, checker=checker, progress=False)
    recs = read_shards(tmp_path / "out")
    expected = {"unfinished": 0, "incorrect": 0, "low_phi": 0}
    for r in recs:
        if r["finish_reason"] != "eos":
            reason = "unfinished"
        elif r["correct"] is False:
            reason = "incorrect"
        elif r["mean_phi"] < -1.5:
            reason = "low_phi"
        else:
            reason = None
        assert r["drop_reason"] == reason and r["keep"] == (reason is None)
        if reason:
            expected[reason] += 1
    assert summary["dropped"] == expected
    assert summary["num_kept"] == 8 - sum(expected.values())
    assert summary["finish_reasons"]["length"] + summary["finish_reasons"]["eos"] + summary["finish_reasons"]["repetition"] == 8
    kept = (tmp_path / "out" / "train.jsonl").read_text().splitlines()
    assert len(kept) == summary["num_kept"]


def test_resume_after_crash_loses_and_duplicates_nothing(tiny_model, tmp_path, monkeypatch):
    model, tok = tiny_model
    data = Dataset.from_list(rows(11))
    full = realign_dataset(model, tok, data, small_config(tmp_path / "full"), checker=None, progress=False)

    import trl_onpolicy.hinted.realign as realign

    decoded = []
    real = realign._decode

    def crashing(*args, **kwargs):
        if len(decoded) == 3:  # shard 0 = batches [0,1,2], [3]; crash in shard 1's first batch
            raise RuntimeError("injected crash")
        decoded.append(kwargs["seed"])
        return real(*args, **kwargs)

    monkeypatch.setattr(realign, "_decode", crashing)
    with pytest.raises(RuntimeError, match="injected crash"):
        realign_dataset(model, tok, data, small_config(tmp_path / "part"), checker=None, progress=False)
    assert [p.name for p in sorted((tmp_path / "part" / "shards").glob("*.jsonl"))] == ["shard-00000.jsonl"]

    monkeypatch.setattr(realign, "_decode", real)
    resumed_calls = []
    monkeypatch.setattr(realign, "_decode", lambda *a, **k: resumed_calls.append(k["seed"]) or real(*a, **k))
    resumed = realign_dataset(model, tok, data, small_config(tmp_path / "part"), checker=None, progress=False)
    # shard 0 (rows 0..3) was not decoded again
    assert all(min(seeds) >= 4 for seeds in resumed_calls)
    a, b = read_shards(tmp_path / "full"), read_shards(tmp_path / "part")
    assert sorted(r["index"] for r in b) == list(range(11))
    assert sorted(a, key=lambda r: r["index"]) == sorted(b, key=lambda r: r["index"])
    assert {k: v for k, v in full.items()} == {k: v for k, v in resumed.items()}


def test_resume_with_other_settings_is_refused(tiny_model, tmp_path):
    model, tok = tiny_model
    data = Dataset.from_list(rows(4))
    realign_dataset(model, tok, data, small_config(tmp_path / "out"), checker=None, progress=False)
    with pytest.raises(ValueError, match="temperature"):
        realign_dataset(model, tok, data, small_config(tmp_path / "out", temperature=0.5), checker=None, progress=False)


def test_rerun_with_other_data_weights_or_settings_is_refused_never_mixed(tiny_model, tmp_path):
    """The manifest records the data's content, the weights and the settings: changing any of them at the same
    output_dir is refused with a message naming what changed (and how to start fresh); the shards stay untouched."""
    model, tok = tiny_model
    data = Dataset.from_list(rows(5))
    out = tmp_path / "out"
    realign_dataset(model, tok, data, small_config(out), checker=None, progress=False)
    shards = {p.name: p.read_bytes() for p in (out / "shards").glob("*.jsonl")}
    # same inputs: resumes (nothing to do) and gives the same shards
    realign_dataset(model, tok, data, small_config(out), checker=None, progress=False)
    other_rows = rows(5)
    other_rows[2] = dict(other_rows[2], solution="He has 9 apples. #### 9")
    with pytest.raises(ValueError, match=r"different data.*new output_dir"):
        realign_dataset(model, tok, Dataset.from_list(other_rows), small_config(out), checker=None, progress=False)
    weight = next(model.parameters())
    saved = weight.detach().clone()
    with torch.no_grad():
        weight.add_(0.01)
    with pytest.raises(ValueError, match="different model"):
        realign_dataset(model, tok, data, small_config(out), checker=None, progress=False)
    with torch.no_grad():
        weight.copy_(saved)
    with pytest.raises(ValueError, match=r"different settings.*top_p"):
        realign_dataset(model, tok, data, small_config(out, top_p=0.9), checker=None, progress=False)
    assert {p.name: p.read_bytes() for p in (out / "shards").glob("*.jsonl")} == shards


def test_invalid_input_writes_no_manifest(tiny_model, tmp_path):
    """A run refused for bad input writes nothing, so the corrected re-run is not refused as "other settings"."""
    model, tok = tiny_model
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="empty or null `solution`"):
        realign_dataset(model, tok, Dataset.from_list(rows(3) + [dict(rows(1)[0], solution="")]), small_config(out),
                        checker=None, progress=False)
    with pytest.raises(ValueError, match="checker"):
        realign_dataset(model, tok, Dataset.from_list(rows(3)), small_config(out, checker="nope"), progress=False)
    assert not out.exists() or not any(out.iterdir())
    realign_dataset(model, tok, Dataset.from_list(rows(3)), small_config(out), checker=None, progress=False)
    assert (out / "manifest.json").exists()


def test_bad_input_errors(tiny_model, tmp_path):
    model, tok = tiny_model
    data = Dataset.from_list([{"q": "x", "s": "y"}])
    with pytest.raises(ValueError, match="question_column"):
        realign_dataset(model, tok, data, small_config(tmp_path / "o"), checker=None, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        RealignConfig(batch_size=0)
    with pytest.raises(ValueError, match="reference"):
        RealignConfig(hint_template="only {question}")
    with pytest.raises(ValueError, match=r"unknown placeholder.*\{answer\}"):
        RealignConfig(hint_template="{question} {reference} {answer}")
    with pytest.raises(ValueError, match="RealignConfig.temperature=nan"):
        RealignConfig(temperature=float("nan"))
    with pytest.raises(ValueError, match="checker"):
        resolve_checker("no_such_checker")
    with pytest.raises(ValueError):
        response_statistics(model, [[1, 2]], [])


def test_analysis_prefix_is_greedy_and_part_of_hinted_prompt(tiny_model):
    model, tok = tiny_model
    ids, analyses = build_hinted_prompt_ids(model, tok, ["What is 2 + 3?"], ["2 + 3 = 5. #### 5"],
                                            analysis_max_new_tokens=5, analysis_stop="\n\n")
    again, _ = build_hinted_prompt_ids(model, tok, ["What is 2 + 3?"], ["2 + 3 = 5. #### 5"],
                                       analysis_max_new_tokens=5, analysis_stop="\n\n")
    assert ids == again  # greedy: deterministic
    text = tok.decode(ids[0])
    assert text.endswith("Solution:\n") and "Analysis: " in text and analyses[0] in text


def _write_recipe(tmp_path, model_dir, data_file, out, **extra):
    recipe = {
        "model_name_or_path": str(model_dir), "dataset_name": str(data_file), "output_dir": str(out),
        "max_new_tokens": 8, "temperature": 1.0, "top_p": 1.0, "batch_size": 2, "shard_size": 2, "splitter": None,
        "drop_unfinished": False, "checker": "none", "score_reference": False, **extra,
    }
    path = tmp_path / "recipe.yaml"
    import yaml

    path.write_text(yaml.safe_dump(recipe))
    return path


def test_cli_parses_recipe_and_rejects_unknown_keys(tiny_model_dir, tmp_path):
    data_file = tmp_path / "data.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in rows(3)))
    recipe = _write_recipe(tmp_path, tiny_model_dir, data_file, tmp_path / "out")
    assert main(["--config", str(recipe), "--max_samples", "3"]) == 0
    assert len(list((tmp_path / "out" / "shards").glob("shard-*.jsonl"))) == 2
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["num_samples"] == 3
    with pytest.raises((SystemExit, ValueError)):
        main(["--config", str(recipe), "--max_new_tokenz", "3"])


def test_cli_sigkill_mid_run_then_resume(tiny_model_dir, tmp_path):
    """Kill the CLI process with SIGKILL after its first shard lands, then re-run: every row exactly once."""
    data_file = tmp_path / "data.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in rows(8)))
    out = tmp_path / "out"
    first = out / "shards" / "shard-00000.jsonl"
    # a checker that stalls once the first shard has landed: the kill always comes mid-run, however loaded the machine
    (tmp_path / "slowcheck.py").write_text(textwrap.dedent("""
        import os, time
        def check(extracted, gold):
            stall_after = os.environ.get("STALL_AFTER")
            if stall_after and os.path.exists(stall_after):
                time.sleep(600)
            return True
    """))
    # score_reference: every row checks its reference ("#### N" always yields an answer), so the checker always runs
    recipe = _write_recipe(tmp_path, tiny_model_dir, data_file, out, checker="slowcheck:check", score_reference=True)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "trl_onpolicy.cli.commands", "realign", "--config", str(recipe)]
    proc = subprocess.Popen(cmd, env={**env, "STALL_AFTER": str(first)}, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not first.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert first.exists(), proc.stderr.read().decode()[-2000:] if proc.poll() is not None else "no shard in time"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(p.name for p in (out / "shards").glob("shard-*.jsonl"))
    assert done == ["shard-00000.jsonl"] and not (out / "summary.json").exists()  # it was really cut off mid-run

    result = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    recs = read_shards(out)
    assert sorted(r["index"] for r in recs) == list(range(8))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_samples"] == 8 and summary["num_kept"] == sum(r["keep"] for r in recs)


DDP_SCRIPT = r'''
import json, sys
import torch
from accelerate import PartialState
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
import trl_onpolicy.hinted.realign as realign

torch.set_num_threads(1)
state = PartialState(cpu=True)
model_dir, data_file, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(model_dir)
tok = AutoTokenizer.from_pretrained(model_dir)
done = []
real = realign.realign_shard
def tracking(model, tokenizer, rows, indices, config, shard, checker, progress=None):
    done.append(shard)
    return real(model, tokenizer, rows, indices, config, shard, checker, progress)
realign.realign_shard = tracking
rows = [json.loads(line) for line in open(data_file)]
config = realign.RealignConfig(**json.loads(sys.argv[4]))
realign.realign_dataset(model, tok, Dataset.from_list(rows), config, checker=None, state=state, progress=False)
with open(f"{out}/rank{state.process_index}.json", "w") as f:
    json.dump({"world": state.num_processes, "shards": done}, f)
from trl_onpolicy.utils.distributed import end_processes
end_processes()  # as the CLI does: no rank exits while a peer still talks to it
'''


def test_data_parallel_two_processes_match_one(tiny_model_dir, tmp_path):
    """torchrun, 2 CPU processes (gloo): each rank decodes its own shards; the merged result equals one process."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data_file = tmp_path / "data.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in rows(9)))
    settings = dict(max_new_tokens=5, temperature=1.0, top_p=1.0, batch_size=2, shard_size=2, splitter=None,
                    drop_unfinished=False, score_reference=False, seed=3)
    out = tmp_path / "ddp"
    (tmp_path / "ddp_realign.py").write_text(DDP_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(tmp_path / "ddp_realign.py"), str(tiny_model_dir), str(data_file), str(out),
           json.dumps({**settings, "output_dir": str(out)})]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == {"world": 2, "shards": [0, 2, 4]} and ranks[1] == {"world": 2, "shards": [1, 3]}

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    single = tmp_path / "single"
    realign_dataset(model, tok, Dataset.from_list(rows(9)), RealignConfig(**settings, output_dir=str(single)),
                    checker=None, progress=False)
    a = [json.loads(x) for x in (out / "train.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (single / "train.jsonl").read_text().splitlines()]
    assert [r["index"] for r in a] == list(range(9))
    assert [r["completion"] for r in a] == [r["completion"] for r in b]
    assert [r["mean_phi"] for r in a] == pytest.approx([r["mean_phi"] for r in b], abs=1e-5)
