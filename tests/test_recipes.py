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


# What docs/launch.md promises of each accelerate config: (distributed_type, num_processes, mixed_precision, the
# DeepSpeed or FSDP settings that matter). GPU configs train in bf16 (the paper's setting); the CPU configs the tests
# launch run fp32 over gloo, as MULTI_GPU/DEEPSPEED/FSDP launches (a MULTI_CPU config or `use_cpu` in the accelerate
# config falls back to ONE process without MPI: the training recipe sets use_cpu instead).
NO_OFFLOAD = {"offload_optimizer_device": "none", "offload_param_device": "none"}
ACCELERATE_CONFIGS = {
    "single_gpu": ("NO", 1, "bf16", {}),
    "multi_gpu": ("MULTI_GPU", 8, "bf16", {}),  # DDP: every GPU holds the full model and optimizer
    # ZeRO-2: optimizer state and gradients sharded, nothing offloaded
    "zero2": ("DEEPSPEED", 8, "bf16", {"zero_stage": 2, **NO_OFFLOAD}),
    # ZeRO-3: parameters sharded too; save_model must gather them into one 16-bit model (else no usable weights)
    "zero3": ("DEEPSPEED", 8, "bf16", {"zero_stage": 3, "zero3_save_16bit_model": True, **NO_OFFLOAD}),
    # ZeRO-3 with parameters and optimizer state in host memory
    "zero3_offload": ("DEEPSPEED", 8, "bf16", {"zero_stage": 3, "zero3_save_16bit_model": True,
                                               "offload_optimizer_device": "cpu", "offload_param_device": "cpu"}),
    # FSDP2: FSDP's activation checkpointing replaces the recipe's gradient checkpointing (launched with
    # --gradient_checkpointing false); a full state dict, so save_model writes one model
    "fsdp2": ("FSDP", 8, "bf16", {"fsdp_version": 2, "fsdp_activation_checkpointing": True,
                                  "fsdp_state_dict_type": "FULL_STATE_DICT", "fsdp_offload_params": False}),
    "cpu_ddp_2proc": ("MULTI_GPU", 2, "no", {}),
    "cpu_zero2_2proc": ("DEEPSPEED", 2, "no", {"zero_stage": 2, **NO_OFFLOAD}),
    "cpu_zero3_2proc": ("DEEPSPEED", 2, "no", {"zero_stage": 3, "zero3_save_16bit_model": True, **NO_OFFLOAD}),
    "cpu_fsdp2_2proc": ("FSDP", 2, "no", {"fsdp_version": 2, "fsdp_activation_checkpointing": True,
                                          "fsdp_state_dict_type": "FULL_STATE_DICT", "fsdp_offload_params": False}),
}


def test_accelerate_configs():
    """Each shipped accelerate config, read by accelerate itself, has the settings docs/launch.md describes."""
    from accelerate.commands.config.config_args import load_config_from_file

    assert {p.stem for p in (RECIPES / "accelerate").glob("*.yaml")} == set(ACCELERATE_CONFIGS)
    launch = (ROOT / "docs" / "launch.md").read_text()
    value = lambda x: str(getattr(x, "value", x))  # noqa: E731 (accelerate enums or plain strings)
    for name, (kind, procs, precision, plugin) in ACCELERATE_CONFIGS.items():
        cfg = load_config_from_file(str(RECIPES / "accelerate" / f"{name}.yaml"))
        got = (value(cfg.distributed_type), cfg.num_processes, value(cfg.mixed_precision), bool(cfg.use_cpu))
        assert got == (kind, procs, precision, False), name
        settings = cfg.deepspeed_config if kind == "DEEPSPEED" else cfg.fsdp_config if kind == "FSDP" else {}
        assert {k: settings.get(k) for k in plugin} == plugin, name
        if kind not in ("DEEPSPEED", "FSDP"):
            assert not cfg.deepspeed_config and not cfg.fsdp_config, name
        if name != "cpu_fsdp2_2proc":  # every other config has its launch line in docs/launch.md
            assert f"--config_file recipes/accelerate/{name}.yaml" in launch, name
    # the FSDP launch line turns the recipe's own gradient checkpointing off, as the config's comment asks
    assert re.search(r"fsdp2\.yaml scripts/train\.py [^\n]*\\\n\s*--gradient_checkpointing false", launch)


def test_readme_lists_every_recipe_with_a_launch_line():
    readme = (RECIPES / "README.md").read_text()
    for recipe in TRAINING_RECIPES:
        rel = f"recipes/{recipe.relative_to(RECIPES)}"
        lines = [line for line in readme.splitlines() if rel in line and line.startswith("|")]
        assert lines, f"{rel} missing from recipes/README.md"
        assert any(("accelerate launch" in line or "trl-onpolicy" in line) for line in lines), rel
    for cfg in (RECIPES / "accelerate").glob("*.yaml"):
        assert f"recipes/accelerate/{cfg.name}" in readme


# every place that names a module, an attribute or a file of the package: the docs (docs/architecture.md lists the
# old paths on purpose), recipes/README.md and the recipes' comments
DOCS_WITH_PATHS = sorted(p for p in (ROOT / "docs").glob("*.md") if p.name != "architecture.md") + [
    ROOT / "README.md", RECIPES / "README.md", *sorted(RECIPES.glob("*/*.yaml"))]


def _resolves(dotted: str) -> str | None:
    """Why ``dotted`` (``trl_onpolicy.x.y.attr``) does not name a module or attribute at its current place, or None."""
    import importlib
    import warnings

    from trl_onpolicy._moved import MOVED

    parts = dotted.split(".")
    for i in range(1, len(parts) + 1):
        if ".".join(parts[:i]) in MOVED:
            return f"{'.'.join(parts[:i])} moved to {MOVED['.'.join(parts[:i])]}"
    for i in range(len(parts), 0, -1):
        module = ".".join(parts[:i])
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", DeprecationWarning)
                obj = importlib.import_module(module)
        except ModuleNotFoundError:
            continue
        except DeprecationWarning as warning:  # a deprecated alias of the package itself
            return str(warning)
        for name in parts[i:]:
            if not hasattr(obj, name):
                return f"{module} has no {'.'.join(parts[i:])}"
            obj = getattr(obj, name)
        return None
    return "no such module"


def test_docs_name_modules_and_files_that_exist():
    """Module paths (``trl_onpolicy.eval.answers.grade_response``), file paths (``trl_onpolicy/hinted/realign.py``) and
    ``-m`` launches in the docs name what exists now, not the flat layout's old paths (which only warn)."""
    import importlib.util

    dotted = re.compile(r"trl_onpolicy(?:\.[A-Za-z_][A-Za-z0-9_]*)+")
    path = re.compile(r"(?<![~/.\w])trl_onpolicy/[A-Za-z0-9_./-]*[A-Za-z0-9_/]")
    launched = re.compile(r"-m (trl_onpolicy[A-Za-z0-9_.]*)")
    stale = []
    for doc in DOCS_WITH_PATHS:
        for number, line in enumerate(doc.read_text().splitlines(), 1):
            where = f"{doc.relative_to(ROOT)}:{number}"
            stale += [(where, ref, why) for ref in dotted.findall(line) if (why := _resolves(ref.rstrip(".")))]
            stale += [(where, ref, "no such file") for ref in path.findall(line) if not (ROOT / ref).exists()]
            for module in launched.findall(line):
                spec = importlib.util.find_spec(module)
                runnable = spec is not None and (spec.submodule_search_locations is None
                                                 or importlib.util.find_spec(module + ".__main__") is not None)
                if not runnable:
                    stale.append((where, f"-m {module}", "cannot be run with python -m"))
    assert not stale, stale
    assert len(DOCS_WITH_PATHS) > 10  # the docs were found


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
