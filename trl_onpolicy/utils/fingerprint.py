"""Fingerprints of what produced a result, so that a cache or resumable output is never reused for other inputs.

A result records ``{"data": ..., "model": ..., "settings": ...}`` (any keys) built from the helpers below; a re-run
compares its own fingerprint with the stored one (`changed_keys`) and either recomputes or refuses with a message
that says what changed (`stale_message`). The fingerprints hash content, never paths or modification times:

- `data_fingerprint`: a ``datasets.Dataset``, a list of rows, or a data file (bytes of the file);
- `model_fingerprint`: a model's tensors and config, read from a folder (once, about 1 s per GB), an embedded alias,
  a weight file or an in-memory model, and independent of the file format and of the library versions that wrote
  it; a Hub id that is not a local folder is its commit;
- `settings_fingerprint`: any JSON-able mapping of settings that change the result.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

from trl_onpolicy.utils.validation import WEIGHT_SUFFIXES

CONFIG_FILES = ("config.json", "generation_config.json", "adapter_config.json")
_BLOCK = 1 << 22


def _sha(update) -> str:
    h = hashlib.sha256()
    update(h)
    return h.hexdigest()[:20]


def _json_default(obj):
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "__dict__"):
        return {k: v for k, v in vars(obj).items() if not k.startswith("_")}
    return repr(obj)


def canonical_json(obj) -> str:
    return json.dumps(obj, sort_keys=True, default=_json_default, ensure_ascii=False, separators=(",", ":"))


def settings_fingerprint(settings: Mapping) -> str:
    text = canonical_json(dict(settings))
    return _sha(lambda h: h.update(text.encode()))


def file_fingerprint(path: str | Path) -> str:
    def upd(h):
        with open(path, "rb") as f:
            while block := f.read(_BLOCK):
                h.update(block)

    return _sha(upd)


def data_fingerprint(data) -> str:
    """Content hash of a dataset: a file or folder of data files, a ``datasets.Dataset``/``IterableDataset``-free
    table, or a sequence of rows (dicts)."""
    if isinstance(data, (str, Path)) and Path(data).exists():
        p = Path(data)
        files = sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p]
        return _sha(lambda h: [h.update(f"{f.relative_to(p) if p.is_dir() else ''}\0{file_fingerprint(f)}".encode()) for f in files])
    table = getattr(data, "data", None)
    if table is not None and hasattr(data, "column_names"):  # datasets.Dataset: hash its Arrow rows in order
        import pyarrow as pa

        t = table.table if hasattr(table, "table") else table
        if getattr(data, "_indices", None) is not None:  # a selected/shuffled view: hash the rows it shows
            t = t.take(data._indices.column(0))

        def upd(h):
            sink = pa.BufferOutputStream()
            with pa.ipc.new_stream(sink, t.schema) as writer:
                writer.write_table(t.combine_chunks())
            h.update(sink.getvalue().to_pybytes())

        return _sha(upd)
    return _sha(lambda h: [h.update((canonical_json(row) + "\n").encode()) for row in data])


# Files of a model folder that are not weights even though their suffix says so: Trainer state saved next to a model.
TRAINER_STATE_FILES = ("training_args.bin", "optimizer.pt", "scheduler.pt", "scaler.pt")
# Config keys that record who wrote the file, not what the model is: the library versions, the dtype the writer
# stamped (the tensors' own dtypes are hashed), and underscore-prefixed bookkeeping (``_name_or_path``,
# ``_commit_hash``, ``_from_model_config``, the GGUF loader's ``_model_name_or_path``, ...). Dropped at every depth.
WRITER_KEYS = frozenset({"transformers_version", "peft_version", "dtype", "torch_dtype"})


def _tensor_digest(t) -> str:
    """sha256 of one tensor's shape, dtype and values (its little-endian bytes, as safetensors stores them)."""
    import torch

    h = hashlib.sha256(f"{tuple(t.shape)}\0{t.dtype}\n".encode())
    flat = t.detach().cpu().contiguous().reshape(-1)
    h.update(memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else b"")
    return h.hexdigest()


def _weights_digest(digests: Mapping[str, str]) -> str:
    """One hash over named tensor digests. Tensors of identical shape, dtype and values are counted once, under the
    name that sorts last: a tied input/output embedding is one tensor whether a writer saved it under both names
    (a state dict, ``torch.save``) or only under one (safetensors) - transformers keeps the embedding's own name
    (``model.embed_tokens.weight``, ``transformer.wte.weight``, ``shared.weight``), which sorts after ``lm_head``.
    Untied tensors that happen to be equal (say, freshly initialised norms) are counted once too; two models then
    hash alike only if they differ by a name whose tensor equals one that is kept, which is what a tie is."""
    by_content: dict[str, str] = {}
    for name, digest in digests.items():
        by_content[digest] = max(name, by_content.get(digest, name))
    return "".join(f"{name}\0{digest}\n" for name, digest in sorted((n, d) for d, n in by_content.items()))


def _strip_writer_keys(obj):
    if isinstance(obj, dict):
        return {k: _strip_writer_keys(v) for k, v in obj.items() if k not in WRITER_KEYS and not str(k).startswith("_")}
    if isinstance(obj, list):
        return [_strip_writer_keys(v) for v in obj]
    return obj


def _configs_text(configs: Mapping[str, Mapping]) -> str:
    return "".join(f"{name}\0{canonical_json(_strip_writer_keys(dict(cfg)))}\n" for name, cfg in sorted(configs.items()))


def _weight_files(folder: Path) -> list[Path]:
    """The weight files ``from_pretrained`` would read: the safetensors files if any, else the torch pickles
    (.bin/.pt/.pth, Trainer state excluded), else .npz, else GGUF files."""
    files = sorted(f for f in folder.iterdir() if f.is_file() and f.suffix in WEIGHT_SUFFIXES)
    for kind in ((".safetensors",), (".bin", ".pt", ".pth"), (".npz",), (".gguf",)):
        chosen = [f for f in files if f.suffix in kind and f.name not in TRAINER_STATE_FILES and not f.name.startswith("rng_state")]
        if chosen:
            return chosen
    return []


def _file_tensor_digests(path: Path) -> dict[str, str]:
    """Named tensor digests of one weight file (a GGUF file: its bytes, under its file name - see `model_fingerprint`)."""
    import torch

    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return {name: _tensor_digest(f.get_tensor(name)) for name in f.keys()}
    if path.suffix == ".npz":
        import numpy as np

        with np.load(path, allow_pickle=False) as arrays:
            return {name: _tensor_digest(torch.from_numpy(arrays[name])) for name in arrays.files}
    if path.suffix == ".gguf":
        return {f"gguf:{path.name}": file_fingerprint(path)}
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # not the zip format torch.save writes by default: mmap is unavailable
        state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"weight file {str(path)!r} is not a mapping of tensor names to tensors; move it out of the "
                         "model folder or save the model with save_pretrained.")
    return {name: _tensor_digest(t) for name, t in state.items()}


def _folder_text(folder: Path, shown: str) -> str:
    files = _weight_files(folder)
    if not files:
        raise FileNotFoundError(f"model folder {shown!r} has no weight files ({', '.join(WEIGHT_SUFFIXES)}).")
    digests: dict[str, str] = {}
    for f in files:
        digests.update(_file_tensor_digests(f))
    configs = {c: json.loads((folder / c).read_text(encoding="utf-8")) for c in CONFIG_FILES if (folder / c).is_file()}
    return _weights_digest(digests) + _configs_text(configs)


def _module_text(model) -> str:
    state = model.state_dict() if hasattr(model, "state_dict") else dict(model)
    text = _weights_digest({name: _tensor_digest(t) for name, t in state.items()})
    configs = {}  # a transformers model's configs as save_pretrained writes them (only the non-default values)
    for file, attr in (("config.json", "config"), ("generation_config.json", "generation_config")):
        cfg = getattr(model, attr, None)
        if hasattr(cfg, "to_diff_dict"):
            configs[file] = cfg.to_diff_dict()
    return text + _configs_text(configs)


def hub_fingerprint(repo_id: str, revision: str | None = None) -> str:
    """``hub:<id>@<commit>`` for a Hub model: the commit the revision points to, asked of the Hub when online, else
    read from the local Hub cache. With neither, ``hub:<id>@<revision>?unverified``: the name of a revision that may
    move, marked so that nobody mistakes it for a content hash."""
    import os
    import re

    rev = revision or "main"
    if re.fullmatch(r"[0-9a-f]{40}", rev):
        return f"hub:{repo_id}@{rev}"
    from huggingface_hub import HfApi, constants, try_to_load_from_cache

    offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if not offline:
        try:
            return f"hub:{repo_id}@{HfApi().model_info(repo_id, revision=rev, timeout=10).sha}"
        except Exception:  # noqa: BLE001 - unreachable or unknown: fall back to the cache
            pass
    for file in ("config.json", "adapter_config.json"):
        cached = try_to_load_from_cache(repo_id, file, revision=rev)
        if isinstance(cached, str):  # <cache>/models--<id>/snapshots/<commit>/<file>
            return f"hub:{repo_id}@{Path(cached).parent.name}"
    return f"hub:{repo_id}@{rev}?unverified"


def model_fingerprint(model, revision: str | None = None) -> str:
    """Fingerprint of a model's content: its tensors (names, shapes, dtypes, values) and its configs as canonical
    JSON less the keys that record the writer (`WRITER_KEYS`, ``_``-prefixed keys).

    ``model`` is a local folder or weight file, an embedded alias (its converted folder), a Hub id (its commit, see
    `hub_fingerprint`), a ``torch.nn.Module`` (its state dict, and a transformers model's config and generation
    config) or a state dict. The same weights saved as safetensors or as a torch pickle, in one file or in shards,
    by one transformers version or another, and held in memory, have one fingerprint. A folder is read the way
    ``from_pretrained`` reads it (the safetensors files when there are any), once, tensor by tensor. A GGUF file is
    hashed by its bytes: it is a published artifact that this project only reads, never rewrites, so its bytes are
    its content (and its header holds the tokenizer and hyper-parameters, which belong to the model).
    """
    if isinstance(model, (str, Path)):
        from trl_onpolicy.utils.models import resolve_model_path

        path = Path(resolve_model_path(str(model)))
        if path.is_dir():
            text = _folder_text(path, str(model))
        elif path.is_file():
            text = _weights_digest(_file_tensor_digests(path))
        else:
            return hub_fingerprint(str(model), revision)
    else:
        text = _module_text(model)
    return _sha(lambda h: h.update(text.encode()))


def changed_keys(old: Mapping | None, new: Mapping) -> list[str]:
    """Keys whose fingerprint differs (a missing old record counts as every key changed)."""
    if old is None:
        return sorted(new)
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def stale_message(what: str, changed: list[str], fresh_hint: str) -> str:
    return (f"{what} was produced from a different {', '.join(changed)} than this run; {fresh_hint}")
