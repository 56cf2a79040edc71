"""Checkpoints of a training run: which ``checkpoint-N`` folders were written to the end, and what
``resume_from_checkpoint`` resumes from (`resume_arg`). Used by `trl_onpolicy.cli.recipe` (which re-exports these
names) and by `trl-onpolicy quickstart`.
"""

from __future__ import annotations

import re
from pathlib import Path

from trl_onpolicy.utils.errors import RecipeError

CHECKPOINT_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                      "pytorch_model.bin.index.json", "adapter_model.safetensors", "adapter_model.bin")


def checkpoint_is_complete(folder) -> bool:
    """Whether a ``checkpoint-N`` folder was written to the end: `Trainer` writes ``trainer_state.json`` last (after
    the weights, optimizer and RNG states), so a folder with a readable one and weights is complete. A DeepSpeed
    checkpoint (``global_step*``) counts as weights."""
    import json

    folder = Path(folder)
    state = folder / "trainer_state.json"
    try:
        json.loads(state.read_text())
    except (OSError, ValueError):
        return False
    return any((folder / name).is_file() for name in CHECKPOINT_WEIGHTS) or any(folder.glob("global_step*"))


def last_complete_checkpoint(output_dir) -> str | None:
    """The newest complete ``checkpoint-N`` of ``output_dir`` (None if there is none); incomplete newer ones (a run
    killed while saving) are skipped with a printed note."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    pattern = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
    found = sorted((int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := pattern.match(p.name)))
    for step, path in reversed(found):
        if checkpoint_is_complete(path):
            return str(path)
        print(f"[trl-onpolicy] {path} is incomplete (no readable trainer_state.json or no weights; a run stopped while "
              "saving it): skipping it.", flush=True)
    return None


def resume_arg(value, output_dir=None):
    """``resume_from_checkpoint``: "true"/"last" resume from the newest complete checkpoint of output_dir (none: start
    fresh, with a note), a path resumes from it (it must be complete), empty/"false" starts fresh."""
    if value is None or str(value).lower() in ("", "false", "no", "none"):
        return None
    if value is True or str(value).lower() in ("true", "last", "yes"):
        if output_dir is None:
            return True
        last = last_complete_checkpoint(output_dir)
        if last is None:
            print(f"[trl-onpolicy] resume_from_checkpoint is set but {output_dir} holds no complete checkpoint: "
                  "starting from the beginning.", flush=True)
        return last
    if not Path(value).is_dir():
        raise RecipeError(f"resume_from_checkpoint={value!r}: no such checkpoint folder.")
    if not checkpoint_is_complete(value):
        raise RecipeError(
            f"resume_from_checkpoint={value!r} is incomplete (no readable trainer_state.json or no weights; the run "
            "stopped while saving it): pass an earlier checkpoint, or resume_from_checkpoint: true for the newest "
            "complete one."
        )
    return value
