"""Fingerprints of what produced a result, so that a cache or resumable output is never reused for other inputs.

A result records ``{"data": ..., "model": ..., "settings": ...}`` (any keys) built from the helpers below; a re-run
compares its own fingerprint with the stored one (`changed_keys`) and either recomputes or refuses with a message
that says what changed (`stale_message`). The fingerprints hash content, never paths or modification times:

- `data_fingerprint`: a ``datasets.Dataset``, a list of rows, or a data file (bytes of the file);
- `model_fingerprint`: a model folder (its weight files and config), an embedded alias, or an in-memory model (its
  state dict); the folder form reads every weight file once (about 1 s per GB);
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


def _weight_files(folder: Path) -> list[Path]:
    files = sorted(f for f in folder.iterdir() if f.is_file() and f.suffix in WEIGHT_SUFFIXES)
    return files + [folder / c for c in CONFIG_FILES if (folder / c).is_file()]


def model_fingerprint(model) -> str:
    """Fingerprint of model weights: a local folder (or embedded alias), or a ``torch.nn.Module`` (its state dict,
    gathered tensors only). A Hub id that is not a local folder is fingerprinted by its name and revision only."""
    if isinstance(model, (str, Path)):
        from trl_onpolicy.utils.models import resolve_model_path

        folder = Path(resolve_model_path(str(model)))
        if folder.is_dir():
            files = _weight_files(folder)
            if not any(f.suffix in WEIGHT_SUFFIXES for f in files):
                raise FileNotFoundError(f"model folder {str(model)!r} has no weight files ({', '.join(WEIGHT_SUFFIXES)}).")
            return _sha(lambda h: [h.update(f"{f.name}\0{file_fingerprint(f)}\n".encode()) for f in files])
        if folder.is_file():
            return file_fingerprint(folder)
        return "hub:" + str(model)
    state = model.state_dict() if hasattr(model, "state_dict") else dict(model)

    def upd(h):
        for name in sorted(state):
            t = state[name]
            h.update(f"{name}\0{tuple(t.shape)}\0{t.dtype}\n".encode())
            h.update(t.detach().cpu().contiguous().view(-1).view(dtype=__import__("torch").uint8).numpy().tobytes())

    return _sha(upd)


def changed_keys(old: Mapping | None, new: Mapping) -> list[str]:
    """Keys whose fingerprint differs (a missing old record counts as every key changed)."""
    if old is None:
        return sorted(new)
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def stale_message(what: str, changed: list[str], fresh_hint: str) -> str:
    return (f"{what} was produced from a different {', '.join(changed)} than this run; {fresh_hint}")
