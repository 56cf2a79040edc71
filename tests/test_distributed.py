"""Real launches on CPU with 2 processes over gloo (accelerate launch and torchrun): the first optimizer step of DDP,
DeepSpeed ZeRO-2 and ZeRO-3 equals a single-process step on the same global batch (IDFT loss), a LoRA run does the
same, and a save/resume through the CLI continues the step count, optimizer state and IDFT schedule.

The step uses plain SGD, so the saved parameter update is ``-lr * gradient`` and the comparison checks gradient
values (Adam's first step would only check their signs). DeepSpeed must be installed (`pip install
deepspeed==0.19.8`); its first run JIT-compiles a small CPU communication extension (~80 s, cached afterwards).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import arithmetic_examples, free_port
from safetensors.torch import load_file

from trl_onpolicy.cli import train

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = ROOT / "recipes" / "accelerate"
BIN = Path(sys.executable).parent
LORA = ["--use_peft", "true", "--lora_r", "4", "--lora_alpha", "8", "--lora_dropout", "0",
        "--lora_target_modules", "q_proj", "v_proj"]


def launch(cmd: list[str], timeout: int = 420) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRL_EXPERIMENTAL_SILENCE="1",
               TOKENIZERS_PARALLELISM="false", WANDB_DISABLED="true")
    proc = subprocess.run([str(c) for c in cmd], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"launch failed ({proc.returncode}):\n{log[-6000:]}"
    return log


@pytest.fixture(scope="module")
def parity(tmp_path_factory, tiny_model_dir):
    """A one-step SGD recipe on the tiny model, and the single-process reference runs (in process, through the CLI)."""
    d = tmp_path_factory.mktemp("parity")
    data = d / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in arithmetic_examples(16)))
    recipe = d / "parity.yaml"
    recipe.write_text(
        f"model_name_or_path: {tiny_model_dir}\ndataset_name: {data}\n"
        "token_loss: idft\nmax_steps: 1\noptim: sgd\nlearning_rate: 0.5\nlr_scheduler_type: constant\n"
        "max_grad_norm: 0.0\ngradient_checkpointing: false\nuse_cpu: true\nreport_to: none\nsave_strategy: 'no'\n"
        "max_length: 64\nseed: 0\nlogging_steps: 1\ndisable_tqdm: true\n"
    )
    runs = {}
    for name, extra in {"full": ["--per_device_train_batch_size", "4"], "half": ["--per_device_train_batch_size", "2"],
                        "lora": ["--per_device_train_batch_size", "4", *LORA]}.items():
        runs[name] = d / f"single-{name}"
        assert train.main(["--config", str(recipe), "--output_dir", str(runs[name]), *extra]) == 0
    return recipe, runs


def updates(init_dir, out_dir) -> dict:
    init, out = load_file(Path(init_dir) / "model.safetensors"), load_file(Path(out_dir) / "model.safetensors")
    assert init.keys() == out.keys()
    return {k: (out[k].double() - init[k].double()) for k in init}


def worst_relative_error(a: dict, b: dict) -> float:
    return max(((a[k] - b[k]).norm() / a[k].norm().clamp(min=1e-30)).item() for k in a if a[k].norm() > 0)


def test_reference_is_sensitive_to_the_batch(parity, tiny_model_dir):
    """Sanity of the comparison below: one process that sees only half of the global batch takes a different step."""
    _, runs = parity
    full, half = updates(tiny_model_dir, runs["full"]), updates(tiny_model_dir, runs["half"])
    assert sum(v.norm() ** 2 for v in full.values()) ** 0.5 > 1e-4
    assert worst_relative_error(full, half) > 1e-2


@pytest.mark.parametrize(
    "config,kind", [("cpu_ddp_2proc", "MULTI_CPU"), ("cpu_zero2_2proc", "DEEPSPEED"), ("cpu_zero3_2proc", "DEEPSPEED")]
)
def test_first_step_matches_single_process(config, kind, parity, tiny_model_dir, tmp_path):
    if kind == "DEEPSPEED":
        # DeepSpeed is a test requirement (dev extra): fail loudly, never skip, when it is missing
        assert shutil.which("ninja", path=str(BIN)) or shutil.which("ninja"), "DeepSpeed's JIT build needs ninja"
        import deepspeed  # noqa: F401 - `pip install deepspeed==0.19.8` (dev extra)
    recipe, runs = parity
    out = tmp_path / config
    log = launch([
        BIN / "accelerate", "launch", "--config_file", ACCELERATE / f"{config}.yaml", "--main_process_port", free_port(),
        ROOT / "scripts" / "train.py", "--config", recipe, "--per_device_train_batch_size", "2", "--output_dir", out,
    ])
    assert f"2 process(es), distributed type {kind}, global batch 4" in log
    reference = updates(tiny_model_dir, runs["full"])
    err = worst_relative_error(reference, updates(tiny_model_dir, out))
    assert err < 1e-4, f"{config}: first-step update differs from the single-process one by {err:.2e} (relative)"


def test_lora_ddp_with_torchrun_matches_single_process(parity, tmp_path):
    recipe, runs = parity
    out = tmp_path / "lora-ddp"
    log = launch([
        BIN / "torchrun", "--nproc_per_node", "2", "--master_port", free_port(), ROOT / "scripts" / "train.py",
        "--config", recipe, "--per_device_train_batch_size", "2", "--output_dir", out, *LORA,
    ])
    assert "2 process(es), distributed type MULTI_CPU" in log
    assert not (out / "model.safetensors").exists()  # only the adapter is saved
    single, ddp = load_file(runs["lora"] / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert single.keys() == ddp.keys() and any("lora_B" in k for k in single)
    for k in single:
        if "lora_A" in k:  # same seeded initialisation, and no gradient reaches A while B == 0
            torch.testing.assert_close(ddp[k], single[k], rtol=0, atol=0)
        else:  # B starts at zero: its value after one SGD step is -lr * gradient
            assert single[k].norm() > 0
            assert (ddp[k] - single[k]).norm() <= 1e-4 * single[k].norm(), k


def test_save_and_resume_through_the_cli(tmp_path, tiny_model_dir):
    """4 steps straight vs 2 steps + resume: same weights (optimizer state and LR schedule restored), step count
    continues at 3, and the IDFT schedule lambda continues (warm-up 1/4, ramp over 2/4 of the steps)."""
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in arithmetic_examples(16)))
    common = [
        "--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(data), "--token_loss", "idft",
        "--idft_warmup_ratio", "0.25", "--idft_transition_ratio", "0.5", "--max_steps", "4",
        "--per_device_train_batch_size", "4", "--learning_rate", "1e-2", "--lr_scheduler_type", "linear",
        "--save_strategy", "steps", "--save_steps", "2", "--logging_steps", "1", "--max_length", "64",
        "--gradient_checkpointing", "false", "--report_to", "none", "--seed", "0", "--disable_tqdm", "true",
    ]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert train.main([*common, "--output_dir", str(straight)]) == 0
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-2", resumed / "checkpoint-2")
    assert train.main([*common, "--output_dir", str(resumed), "--resume_from_checkpoint", "true"]) == 0

    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
    state = json.loads((resumed / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    straight_log = {h["step"]: h for h in json.loads((straight / "checkpoint-4" / "trainer_state.json").read_text())["log_history"] if "idft_lambda" in h}
    resumed_log = {h["step"]: h for h in state["log_history"] if "idft_lambda" in h}
    # lambda during step s uses progress (s - 1) / 4: 0, 0, 0.5, 1 (a restarted schedule would give 0, 0 again)
    expected = {1: 0.0, 2: 0.0, 3: 0.5, 4: 1.0}
    for step in (3, 4):
        assert resumed_log[step]["idft_lambda"] == pytest.approx(expected[step])
        assert resumed_log[step]["idft_lambda"] == pytest.approx(straight_log[step]["idft_lambda"])
        assert resumed_log[step]["loss"] == pytest.approx(straight_log[step]["loss"], rel=1e-5)


@pytest.mark.parametrize("world", ["1", "2"])
def test_exit_process_skips_finalization_only_in_a_multi_process_launch(world):
    """The launched scripts end with `exit_process`: in a rank of a multi-process launch it leaves without
    finalizing the interpreter (no atexit handler runs; gloo threads that DDP/DeepSpeed keep alive past
    destroy_process_group aborted ranks during finalization), after flushing what was printed; alone it is sys.exit."""
    code = ("import atexit, sys\nfrom trl_onpolicy.utils.distributed import exit_process\n"
            "atexit.register(lambda: print('finalized', flush=True))\n"
            "print('work done', end='')\nprint('to stderr', end='', file=sys.stderr)\nexit_process(3)\n")
    env = dict(os.environ, WORLD_SIZE=world)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3
    assert proc.stdout.startswith("work done") and proc.stderr.endswith("to stderr")
    assert ("finalized" in proc.stdout) == (world == "1")
