"""`trl-onpolicy quickstart` end to end on the tiny offline model: trains, prints and saves statistics, resumes."""

import json

import pytest
import torch

from trl_onpolicy.data.datasets import math_word_problems
from trl_onpolicy.ops.lm_head import full_softmax_statistics
from trl_onpolicy.cli.quickstart import main


def _reference_phi(model_dir, rows, beta=1.0, gamma_min=0.1, gamma_max=2.0):
    """float64 full-softmax phi and gamma of the completion tokens, tokenized the way TRL does for conversations."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    phis = []
    for row in rows:
        prompt = tok.apply_chat_template(row["prompt"], add_generation_prompt=True, return_dict=True)["input_ids"]
        full = tok.apply_chat_template(row["prompt"] + row["completion"], return_dict=True)["input_ids"]
        assert full[: len(prompt)] == prompt
        ids = torch.tensor([full])
        with torch.no_grad():
            logits = model(ids).logits[0, len(prompt) - 1 : -1]
        stats = full_softmax_statistics(logits, ids[0, len(prompt) :])
        phis.append(stats["log_probs"] + stats["entropy"])
    phi = torch.cat(phis)
    gamma = torch.exp(-phi / beta).clamp(gamma_min, gamma_max)
    return phi, gamma


@pytest.mark.slow
def test_quickstart_trains_reports_saves_and_resumes(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    common = ["--model_name_or_path", str(tiny_model_dir), "--output_dir", str(out), "--task", "chain_sum"]
    common += ["--num_samples", "4", "--save_steps", "1", "--learning_rate", "1e-3"]
    assert main([*common, "--max_steps", "2"]) == 0
    printed = capsys.readouterr().out
    assert "training data under the initial model: phi mean" in printed
    assert "training data under the trained model: phi mean" in printed
    assert (out / "model.safetensors").is_file() and (out / "tokenizer_config.json").is_file()
    assert (out / "checkpoint-2").is_dir()
    stats = json.loads((out / "quickstart_stats.json").read_text())
    assert stats["global_step"] == 2 and stats["resumed_from"] is None

    # the printed statistics match an independent float64 full-softmax recomputation, before and after training
    rows = math_word_problems(4, seed=0, task="chain_sum", max_solution_chars=200).to_list()
    for label, model_dir in (("before", tiny_model_dir), ("after", out)):
        phi, gamma = _reference_phi(model_dir, rows)
        s = stats[label]
        assert s["num_tokens"] == phi.numel()
        assert s["phi_mean"] == pytest.approx(phi.mean().item(), abs=1e-4)
        assert s["phi_std"] == pytest.approx(phi.std().item(), abs=1e-4)
        assert s["phi_below_-1"] == pytest.approx((phi < -1).double().mean().item(), abs=1e-9)
        assert s["gamma_mean"] == pytest.approx(gamma.mean().item(), abs=1e-4)
        assert f"phi mean {s['phi_mean']:+.4f}" in printed
    # training on the data made it more likely under the model
    assert stats["after"]["phi_mean"] > stats["before"]["phi_mean"]

    # a re-run with more steps continues from the last complete checkpoint instead of starting over; a newer one
    # that an interruption cut short (weights written, trainer_state.json not yet) is skipped, not trusted
    partial = out / "checkpoint-9"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes((out / "checkpoint-2" / "model.safetensors").read_bytes()[:100])
    assert main([*common, "--max_steps", "3"]) == 0
    printed = capsys.readouterr().out
    assert f"{partial} is incomplete" in printed
    assert f"resuming from {out / 'checkpoint-2'}" in printed
    stats = json.loads((out / "quickstart_stats.json").read_text())
    assert stats["global_step"] == 3 and stats["resumed_from"].endswith("checkpoint-2")


def test_quickstart_rejects_bad_options(tmp_path):
    with pytest.raises(ValueError, match=r"quickstart.max_steps=0 is invalid: expected an integer >= 1"):
        main(["--max_steps", "0", "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match=r"quickstart.learning_rate=nan is invalid"):
        main(["--learning_rate", "nan", "--output_dir", str(tmp_path)])
