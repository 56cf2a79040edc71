"""FSDP2 (fully_shard) with 2 CPU processes over gloo: one optimizer step of every token loss (nll, dft, idft, EAFT
with its top-k entropy) and of online mode (Hinted Decoding with ``compute_phi``) updates the weights exactly as a
single-process step on the same global batch, and logs the same first-step loss and phi; DDT scoring of the sharded
model after the step gives the phi of the single-process model.

Under FSDP2 every parameter is a DTensor shard outside the forward; the LM-head statistics
(`trl_onpolicy.ops.lm_head.token_statistics`) and the direct backbone + head calls of DDT scoring (online
``compute_phi``) gather what they use (`full_tensor`, `unsharded`). The launch uses
recipes/accelerate/cpu_fsdp2_2proc.yaml, with FSDP's activation checkpointing on as docs/launch.md recommends; see
tests/fsdp2_child.py for how FSDP runs on a machine without an accelerator.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import arithmetic_examples, free_port, word_problem_rows
from fsdp2_child import LOSSES, ONLINE, full_state, one_step, scored_phi
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
NAMES = [*LOSSES, "online"]


@pytest.fixture(scope="module")
def fsdp2_runs(tmp_path_factory, tiny_model_dir):
    """The 2-process FSDP2 launch (all runs in one launch) and the single-process reference of each run."""
    d = tmp_path_factory.mktemp("fsdp2")
    sft, online = arithmetic_examples(16), word_problem_rows(4)
    files = {}
    for name, rows in (("sft", sft), ("online", online)):
        files[name] = d / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    cmd = [BIN / "accelerate", "launch", "--config_file", ROOT / "recipes" / "accelerate" / "cpu_fsdp2_2proc.yaml",
           "--main_process_port", free_port(), Path(__file__).with_name("fsdp2_child.py"), tiny_model_dir,
           files["sft"], files["online"], d]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRL_EXPERIMENTAL_SILENCE="1", TOKENIZERS_PARALLELISM="false", WANDB_DISABLED="true")
    proc = subprocess.run([str(c) for c in cmd], cwd=ROOT, env=env, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]

    reference = {}
    for name in NAMES:  # the same global batch (4) in one process, no sharding
        rows, config = (online, {**ONLINE, "online": True}) if name == "online" else (sft, LOSSES[name])
        trainer = one_step(tiny_model_dir, rows, d / "single", name, per_device=4, **config)
        reference[name] = {"weights": full_state(trainer.model), "logged": trainer.state.log_history[0],
                           "ddt_phi": scored_phi(trainer.model, trainer.processing_class)}
    return d, reference


@pytest.mark.parametrize("name", NAMES)
def test_fsdp2_step_matches_single_process(fsdp2_runs, tiny_model_dir, name):
    d, reference = fsdp2_runs
    info = json.loads((d / f"{name}.json").read_text())
    # the run really was sharded by FSDP2 over 2 processes, with FSDP's activation checkpointing
    assert info["distributed_type"].endswith("FSDP") and info["fsdp_version"] == 2 and info["world"] == 2
    assert info["model_class"].startswith("FSDP") and info["dtensor_parameters"] == info["parameters"] > 0
    assert info["activation_checkpointing"] is True

    init = load_file(Path(tiny_model_dir) / "model.safetensors")
    fsdp, single = load_file(d / f"{name}.safetensors"), reference[name]["weights"]
    assert fsdp.keys() == single.keys()
    moved = 0
    for key, value in single.items():
        step = value.double() - init[key].double()
        if step.norm() == 0:
            continue
        moved += 1
        err = ((fsdp[key].double() - init[key].double()) - step).norm() / step.norm()
        assert err < 1e-4, f"{name}: the update of {key} differs from the single-process one by {err:.2e} (relative)"
    assert moved >= len(single) // 2  # the step moved most tensors, so the comparison has power

    logged, ref = info["logged"], reference[name]["logged"]
    for key in ("loss", "phi_mean", "entropy", "num_tokens", *(("hinted/mean_phi",) if name == "online" else ())):
        assert logged[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-6), key
    # DDT scoring of the sharded model after its step (parameters resharded): the single-process model's phi
    for fsdp_phi, single_phi in zip(info["ddt_phi"], reference[name]["ddt_phi"], strict=True):
        assert fsdp_phi == pytest.approx(single_phi, abs=1e-4)
