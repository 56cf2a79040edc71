"""Recipes and entry points: every shipped recipe validates with --dry_run (no download, no training), recipe keys are
checked, overrides and the env block work, and DPO/SimPO really train a step on a tiny model."""

import json
import os
import re
from pathlib import Path

import pytest
import yaml
from conftest import arithmetic_examples

from trl_onpolicy.cli import dpo, simpo, train

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
# recipes/ddt, recipes/realign and recipes/compare belong to other commands and are tested with them
TRAINING_RECIPES = sorted(
    p for p in RECIPES.glob("*/*.yaml") if p.parent.name not in ("accelerate", "ddt", "realign", "compare")
)
ENTRY = {"dpo": dpo, "simpo": simpo}


def entry_for(recipe: Path):
    return ENTRY.get(recipe.stem, train)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def sft_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "sft.jsonl", arithmetic_examples(24))


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    rows = [
        {"prompt": r["prompt"], "chosen": r["completion"], "rejected": [{"role": "assistant", "content": "No idea."}]}
        for r in arithmetic_examples(8)
    ]
    return write_jsonl(tmp_path_factory.mktemp("data") / "pairs.jsonl", rows)


def test_recipes_are_shipped():
    names = {str(p.relative_to(RECIPES)) for p in TRAINING_RECIPES}
    for size in ("qwen2.5-math-1.5b", "qwen2.5-math-7b"):
        for method in ("idft", "dft", "eaft", "sft", "dpo", "simpo"):
            assert f"{size}/{method}.yaml" in names
    assert {"quickstart/cpu_idft.yaml", "qwen2.5-math-1.5b/idft_hinted.yaml", "qwen2.5-math-1.5b-instruct/idft.yaml",
            "quickstart/cpu_idft_online.yaml", "qwen2.5-math-1.5b/idft_online.yaml"} <= names


@pytest.mark.parametrize("recipe", TRAINING_RECIPES, ids=lambda p: str(p.relative_to(RECIPES)))
def test_every_recipe_dry_runs(recipe, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative output_dir / data paths resolve here: nothing may be written
    out_dir = tmp_path / "would-be-output"
    argv = ["--config", str(recipe), "--dry_run", "--output_dir", str(out_dir)]
    assert entry_for(recipe).main(argv) == 0
    out = capsys.readouterr().out
    assert "nothing was trained" in out
    assert not out_dir.exists()
    spec = yaml.safe_load(recipe.read_text())
    model = spec["model_name_or_path"]
    if model.startswith("embedded:"):
        assert "embedded" in out and ("LlamaForCausalLM" in out or "would convert" in out)
    else:
        assert f"would load {model!r}" in out and "not downloaded" in out
    if str(spec["dataset_name"]).startswith("reasoning-gym:"):
        n = int(spec["dataset_name"].rsplit(":", 1)[1])
        assert re.search(rf"train samples\s+{n}\b", out)
    else:
        assert "would" in out.split("data", 1)[1].splitlines()[0]


def test_paper_recipes_carry_the_paper_settings(capsys):
    for recipe in sorted(RECIPES.glob("qwen2.5-math-*b/*.yaml")):
        spec = yaml.safe_load(recipe.read_text())
        if recipe.stem in ("idft", "dft", "eaft", "sft"):
            assert spec["dataset_name"] == "AI-MO/NuminaMath-CoT" and spec["dataset_train_split"] == "train[:100000]"
            assert spec["learning_rate"] == 6e-5 and spec["num_train_epochs"] == 1
            assert (spec["adam_beta1"], spec["adam_beta2"], spec["weight_decay"], spec["max_grad_norm"]) == (0.9, 0.95, 0.01, 1.0)
            assert spec["lr_scheduler_type"] == "cosine" and spec["warmup_steps"] == 0.1
            assert spec["per_device_train_batch_size"] * spec["gradient_accumulation_steps"] * 8 == 256
            assert {"sft": "nll"}.get(recipe.stem, recipe.stem) == spec["token_loss"]
    # the dry run reports the global batch for the intended 8 processes
    assert train.main(["--config", str(RECIPES / "qwen2.5-math-7b/idft.yaml"), "--dry_run", "--dry_run_num_processes", "8"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"global batch\s+256 = per_device_train_batch_size 2 x gradient_accumulation_steps 16 x 8 process", out)
    # 100000 samples (the split's slice) / 256 per step, 1 epoch
    assert re.search(r"optimizer steps\s+391 \(from the split slice", out)


def test_accelerate_configs():
    expected = {
        "single_gpu": ("NO", 1), "multi_gpu": ("MULTI_GPU", 8), "zero2": ("DEEPSPEED", 8), "zero3": ("DEEPSPEED", 8),
        "zero3_offload": ("DEEPSPEED", 8), "fsdp2": ("FSDP", 8), "cpu_ddp_2proc": ("MULTI_GPU", 2),
        "cpu_zero2_2proc": ("DEEPSPEED", 2), "cpu_zero3_2proc": ("DEEPSPEED", 2),
    }
    from accelerate.commands.config.config_args import load_config_from_file

    for name, (kind, procs) in expected.items():
        cfg = load_config_from_file(str(RECIPES / "accelerate" / f"{name}.yaml"))
        assert (str(getattr(cfg.distributed_type, 'value', cfg.distributed_type)), cfg.num_processes) == (kind, procs), name
        if kind == "DEEPSPEED":
            assert cfg.deepspeed_config["zero_stage"] == int(re.search(r"zero(\d)", name).group(1))
        if name.startswith("cpu_"):
            assert str(getattr(cfg.mixed_precision, "value", cfg.mixed_precision)) == "no"
    off = load_config_from_file(str(RECIPES / "accelerate" / "zero3_offload.yaml")).deepspeed_config
    assert off["offload_param_device"] == off["offload_optimizer_device"] == "cpu"


def test_readme_lists_every_recipe_with_a_launch_line():
    readme = (RECIPES / "README.md").read_text()
    for recipe in TRAINING_RECIPES:
        rel = f"recipes/{recipe.relative_to(RECIPES)}"
        lines = [line for line in readme.splitlines() if rel in line and line.startswith("|")]
        assert lines, f"{rel} missing from recipes/README.md"
        assert any(("accelerate launch" in line or "trl-onpolicy" in line) for line in lines), rel
    for cfg in (RECIPES / "accelerate").glob("*.yaml"):
        assert f"recipes/accelerate/{cfg.name}" in readme


# ------------------------------------------------------------------------------------------- errors name the key


def run_err(module, argv, capsys):
    rc = module.main(argv)
    return rc, capsys.readouterr().err


def test_unknown_recipe_key_is_named(tmp_path, tiny_model_dir, sft_file, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model_name_or_path: {tiny_model_dir}\ndataset_name: {sft_file}\nleaning_rate: 1.0e-4\n")
    rc, err = run_err(train, ["--config", str(recipe), "--dry_run"], capsys)
    assert rc == 2 and "'leaning_rate'" in err and "did you mean 'learning_rate'" in err


def test_unknown_and_abbreviated_flags_are_named(tiny_model_dir, sft_file, capsys):
    base = ["--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(sft_file), "--dry_run"]
    rc, err = run_err(train, base + ["--idft_gama_max", "1.0"], capsys)
    assert rc == 2 and "'idft_gama_max'" in err and "idft_gamma_max" in err
    rc, err = run_err(train, base + ["--learning_rat", "1e-4"], capsys)  # argparse would accept it as an abbreviation
    assert rc == 2 and "'learning_rat'" in err


@pytest.mark.parametrize("missing", ["model_name_or_path", "dataset_name"])
def test_missing_required_key_is_named(missing, tiny_model_dir, sft_file, capsys):
    values = {"model_name_or_path": str(tiny_model_dir), "dataset_name": str(sft_file)}
    del values[missing]
    argv = [a for k, v in values.items() for a in (f"--{k}", v)] + ["--dry_run"]
    rc, err = run_err(train, argv, capsys)
    assert rc == 2 and f"missing required key '{missing}'" in err


def test_invalid_values_and_columns(tiny_model_dir, sft_file, pairs_file, capsys):
    base = ["--model_name_or_path", str(tiny_model_dir), "--dry_run"]
    rc, err = run_err(train, base + ["--dataset_name", str(sft_file), "--idft_beta", "0"], capsys)
    assert rc == 2 and "idft_beta" in err
    rc, err = run_err(simpo, base + ["--dataset_name", str(pairs_file), "--cpo_alpha", "1.0"], capsys)
    assert rc == 2 and "cpo_alpha" in err
    rc, err = run_err(simpo, base + ["--dataset_name", str(pairs_file), "--loss_type", "sigmoid"], capsys)
    assert rc == 2 and "loss_type" in err
    rc, err = run_err(dpo, base + ["--dataset_name", str(sft_file)], capsys)
    assert rc == 2 and "chosen+rejected" in err
    rc, err = run_err(train, base + ["--dataset_name", str(pairs_file)], capsys)
    assert rc == 2 and "prompt+completion" in err
    # a local dataset that does not exist: reported by a dry run (recipes may name a corpus still to be built), an
    # error when training
    missing = ["--dataset_name", str(sft_file) + ".missing.jsonl"]
    assert train.main(base + missing) == 0 and "does not exist yet" in capsys.readouterr().out
    rc, err = run_err(train, base[:2] + missing + ["--output_dir", str(Path(sft_file).parent / "never")], capsys)
    assert rc == 2 and "does not exist" in err
    rc, err = run_err(train, base + ["--dataset_name", str(sft_file), "--eval_strategy", "steps"], capsys)
    assert rc == 2 and "test_split_size" in err


def test_cli_reports_bad_input_in_one_line(tmp_path, capsys, monkeypatch):
    """`trl-onpolicy <data command>` turns a bad value or a missing file into one error line and exit status 2 (no
    model is loaded); TRL_ONPOLICY_TRACEBACK=1 re-raises for bug reports."""
    from trl_onpolicy.cli import commands as cli

    monkeypatch.delenv("TRL_ONPOLICY_TRACEBACK", raising=False)
    for argv, needle in [
        (["pairs", "--top_p", "0"], "top_p=0.0 is invalid: expected a finite number in (0, 1]"),
        (["eval", "--num_samples", "4", "--temperature", "0"], "greedy decoding gives k identical"),
        (["ddt-filter", "--output_dir", str(tmp_path / "o"), "--scores_file", str(tmp_path / "s.jsonl"),
          "--filter_by", "mean_phi", "--min_value", "-1", "--dataset_name", str(tmp_path / "nowhere.jsonl")],
         "nowhere.jsonl' does not exist"),
    ]:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith(f"trl-onpolicy {argv[0]}: error:") and needle in err, err
        assert "Traceback" not in err
    monkeypatch.setenv("TRL_ONPOLICY_TRACEBACK", "1")
    with pytest.raises(ValueError, match="top_p"):
        cli.main(["pairs", "--top_p", "0"])


# ---------------------------------------------------------------------------------- overrides, env, data sources


def test_cli_overrides_recipe_env_block_and_splits(tmp_path, tiny_model_dir, sft_file, capsys, monkeypatch):
    monkeypatch.delenv("TRL_ONPOLICY_RECIPE_TEST", raising=False)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"model_name_or_path: {tiny_model_dir}\ndataset_name: {sft_file}\ndataset_train_split: 'train[:10]'\n"
        "token_loss: dft\nlearning_rate: 1.0e-4\nenv:\n  TRL_ONPOLICY_RECIPE_TEST: from-recipe\n"
    )
    parser = train.make_train_parser()
    from trl_onpolicy.cli.recipe import parse_recipe

    script_args, args, model_args, _, run_args, hinted = parse_recipe(
        parser, ["--config", str(recipe), "--token_loss", "eaft", "--dry_run", "--output_dir", str(tmp_path / "o")]
    )
    assert (args.token_loss, args.learning_rate, run_args.dry_run, hinted.hinted_online) == ("eaft", 1e-4, True, False)
    assert os.environ["TRL_ONPOLICY_RECIPE_TEST"] == "from-recipe"
    assert train.main(["--config", str(recipe), "--dry_run", "--output_dir", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert re.search(r"train samples\s+10\b", out) and "dft (weight p)" in out
    # carve a test split out of the training data
    argv = ["--config", str(recipe), "--dry_run", "--eval_strategy", "steps", "--test_split_size", "0.2", "--output_dir", str(tmp_path / "o")]
    assert train.main(argv) == 0
    out = capsys.readouterr().out
    assert re.search(r"train samples\s+8\b", out) and re.search(r"eval samples\s+2\b", out)


def test_saved_dataset_folder_and_embedded_generator(tmp_path, tiny_model_dir, capsys):
    from datasets import Dataset, DatasetDict

    folder = tmp_path / "saved"
    DatasetDict(train=Dataset.from_list(arithmetic_examples(12)), test=Dataset.from_list(arithmetic_examples(4))).save_to_disk(folder)
    argv = ["--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(folder), "--eval_strategy", "steps", "--dry_run"]
    assert train.main(argv) == 0
    out = capsys.readouterr().out
    assert re.search(r"train samples\s+12\b", out) and re.search(r"eval samples\s+4\b", out)
    # global batch and steps: 12 samples / (3 x 2) = 2 steps per epoch, 3 epochs
    argv += ["--per_device_train_batch_size", "3", "--gradient_accumulation_steps", "2", "--num_train_epochs", "3"]
    assert train.main(argv) == 0
    out = capsys.readouterr().out
    assert re.search(r"global batch\s+6 = ", out) and re.search(r"optimizer steps\s+6\b", out)


# ------------------------------------------------------------------------------------ DPO and SimPO really train


TRAIN_FLAGS = ["--max_steps", "1", "--per_device_train_batch_size", "2", "--report_to", "none", "--max_length", "96",
               "--save_strategy", "no", "--gradient_checkpointing", "false", "--learning_rate", "1e-3"]


def test_dpo_trains_a_step(tmp_path, tiny_model_dir, pairs_file):
    out = tmp_path / "dpo"
    argv = ["--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(pairs_file), "--output_dir", str(out)]
    assert dpo.main(argv + TRAIN_FLAGS) == 0
    assert changed_params(tiny_model_dir, out) > 0


def test_simpo_trains_pure_simpo(tmp_path, tiny_model_dir, pairs_file):
    import torch

    out = tmp_path / "simpo"
    argv = ["--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(pairs_file), "--output_dir", str(out)]
    assert simpo.main(argv + TRAIN_FLAGS) == 0
    args = torch.load(out / "training_args.bin", weights_only=False)
    assert (args.loss_type, args.cpo_alpha) == ("simpo", 0.0)
    assert changed_params(tiny_model_dir, out) > 0


def changed_params(before_dir, after_dir) -> int:
    from safetensors.torch import load_file

    before, after = load_file(Path(before_dir) / "model.safetensors"), load_file(Path(after_dir) / "model.safetensors")
    assert before.keys() == after.keys()
    return sum(int(not (before[k] == after[k]).all()) for k in before)
