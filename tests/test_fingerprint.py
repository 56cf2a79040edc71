"""`trl_onpolicy.utils.fingerprint.model_fingerprint` hashes a model's content, not the files a library wrote.

The same weights saved as safetensors, as a torch pickle and in shards, by one transformers version or another, and
held in memory, must give one fingerprint; a changed value or dtype must not. Each saved form is checked to really
be that form (a .bin folder has no safetensors, a sharded folder has several files, a tied model's safetensors lacks
the output embedding) so that each test reaches the branch it names.
"""

import json
import shutil

import pytest
import torch

from trl_onpolicy.testing.tiny import make_tiny_model
from trl_onpolicy.utils import fingerprint as fp


def _save_bin(model, folder, state=None):
    """A folder in the torch-pickle form, written without transformers: ``pytorch_model.bin`` plus the configs."""
    folder.mkdir(parents=True)
    torch.save(state if state is not None else model.state_dict(), folder / "pytorch_model.bin")
    model.config.to_json_file(folder / "config.json")
    model.generation_config.to_json_file(folder / "generation_config.json")
    return folder


@pytest.fixture
def saved(tmp_path, tiny_model):
    model, _ = tiny_model
    model.save_pretrained(tmp_path / "st")
    return model, tmp_path


def test_safetensors_bin_sharded_and_in_memory_have_one_fingerprint(saved):
    model, tmp = saved
    _save_bin(model, tmp / "bin")
    model.save_pretrained(tmp / "shards", max_shard_size="100KB")
    assert not list((tmp / "bin").glob("*.safetensors"))
    assert len(list((tmp / "shards").glob("*.safetensors"))) > 1
    one = fp.model_fingerprint(str(tmp / "st"))
    assert fp.model_fingerprint(str(tmp / "bin")) == one
    assert fp.model_fingerprint(str(tmp / "shards")) == one
    assert fp.model_fingerprint(model) == one
    # a single weight file is its tensors (its folder adds the configs)
    single = fp.model_fingerprint(str(tmp / "st" / "model.safetensors"))
    assert single == fp.model_fingerprint(str(tmp / "bin" / "pytorch_model.bin")) != one


def test_writer_bookkeeping_in_configs_is_ignored_but_model_keys_count(saved):
    model, tmp = saved
    one = fp.model_fingerprint(str(tmp / "st"))
    for name, edit in (("config.json", {"transformers_version": "4.0.0", "_name_or_path": "/elsewhere/x",
                                        "torch_dtype": "float32"}),
                       ("generation_config.json", {"transformers_version": "4.0.0", "_from_model_config": False})):
        cfg = json.loads((tmp / "st" / name).read_text())
        cfg.pop("dtype", None)  # transformers 4 wrote torch_dtype where 5 writes dtype
        (tmp / "st" / name).write_text(json.dumps({**cfg, **edit}, indent=4))
    assert json.loads((tmp / "st" / "config.json").read_text())["transformers_version"] == "4.0.0"
    assert fp.model_fingerprint(str(tmp / "st")) == one
    cfg = json.loads((tmp / "st" / "config.json").read_text())
    (tmp / "st" / "config.json").write_text(json.dumps({**cfg, "rms_norm_eps": cfg["rms_norm_eps"] * 2}))
    assert fp.model_fingerprint(str(tmp / "st")) != one


def test_one_changed_value_and_a_dtype_change_are_different_models(saved):
    model, tmp = saved
    one = fp.model_fingerprint(str(tmp / "st"))
    shutil.copytree(tmp / "st", tmp / "edited")
    from safetensors.torch import load_file, save_file

    state = load_file(tmp / "edited" / "model.safetensors")
    name = sorted(state)[len(state) // 2]
    state[name].view(-1)[0] += 1e-6
    save_file(state, tmp / "edited" / "model.safetensors", metadata={"format": "pt"})
    assert fp.model_fingerprint(str(tmp / "edited")) != one
    model.to(torch.bfloat16).save_pretrained(tmp / "bf16")
    low = fp.model_fingerprint(str(tmp / "bf16"))
    # same config apart from the dtype stamp, same names and shapes: only the tensors' dtype tells them apart
    assert low != one and low == fp.model_fingerprint(model)


def test_tied_embeddings_are_one_tensor_in_every_form(tmp_path, tiny_tokenizer):
    from transformers import Qwen2ForCausalLM

    untied, _ = make_tiny_model(tiny_tokenizer)
    config = untied.config
    config.tie_word_embeddings = True
    torch.manual_seed(1)
    model = Qwen2ForCausalLM(config)
    state = model.state_dict()
    assert state["lm_head.weight"].data_ptr() == state["model.embed_tokens.weight"].data_ptr()
    model.save_pretrained(tmp_path / "st")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "st" / "model.safetensors"), framework="pt") as f:
        assert "lm_head.weight" not in f.keys()  # safetensors keeps one name of the tied pair
    _save_bin(model, tmp_path / "bin")  # a plain state dict keeps both names
    one = fp.model_fingerprint(str(tmp_path / "st"))
    assert fp.model_fingerprint(str(tmp_path / "bin")) == one == fp.model_fingerprint(model)
    # untying and changing the output embedding is another model
    separate = {**state, "lm_head.weight": state["lm_head.weight"].clone() * 2}
    _save_bin(model, tmp_path / "untied", state=separate)
    assert fp.model_fingerprint(str(tmp_path / "untied")) != one


def test_trainer_state_next_to_the_weights_is_not_the_model(saved):
    model, tmp = saved
    one = fp.model_fingerprint(str(tmp / "st"))
    torch.save({"learning_rate": 1e-5}, tmp / "st" / "training_args.bin")
    (tmp / "st" / "model.safetensors.index.json").write_text("{}")
    assert fp.model_fingerprint(str(tmp / "st")) == one
    (tmp / "pickled").mkdir()
    torch.save({"step": 3, "note": "not weights"}, tmp / "pickled" / "pytorch_model.bin")
    with pytest.raises(ValueError, match="not a mapping of tensor names to tensors"):
        fp.model_fingerprint(str(tmp / "pickled"))


def test_hub_id_is_its_cached_commit_offline_else_marked_unverified(tmp_path, monkeypatch):
    from huggingface_hub import constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--someone--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "config.json").write_text("{}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert fp.model_fingerprint("someone/tiny") == f"hub:someone/tiny@{commit}"
    assert fp.model_fingerprint("someone/tiny", revision=commit) == f"hub:someone/tiny@{commit}"
    assert fp.model_fingerprint("someone/other") == "hub:someone/other@main?unverified"
    assert fp.model_fingerprint("someone/tiny", revision="v2") == "hub:someone/tiny@v2?unverified"
