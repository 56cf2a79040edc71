"""SDFT (Self-Distillation Fine-Tuning, Shenfeld et al., arXiv 2601.19897) as a baseline: a thin wrapper around TRL's
`trl.experimental.sdft.SDFTTrainer`.

SDFT trains on-policy: the student samples a response to the plain prompt, and is pulled (top-k logit distillation)
towards a teacher that is the same network conditioned on the demonstration. Here the demonstration
(``privileged_context``) is the row's reference solution, so SDFT sees exactly the information SFT sees, but only
through the teacher's distribution over the student's own samples.

`train_sdft` is the one entry point; it builds the dataset and an `SDFTConfig` and runs the trainer. What it sets,
and why (everything else is TRL 1.16's default):

- dataset: ``prompt`` = the row's conversational prompt (system messages kept; SDFT appends the privileged context
  to the LAST USER turn with ``teacher_prompt_template = "{prompt}\\n\\n{privileged_context}"``, TRL's default);
  ``privileged_context`` = the row's ``solution`` string, else the text of its ``completion`` messages.
- ``remove_unused_columns=False`` (TRL's default too; stated because the trainer needs ``privileged_context``).
- ``num_generations=1`` unless given: TRL's default (8) would put one prompt in a step of 8 samples. SDFT's loss has
  no group baseline, so one sample per prompt keeps the same prompts per optimizer step as SFT at the same batch.
  A given value must divide ``per_device_train_batch_size * gradient_accumulation_steps`` (TRL's rule).
- teacher: ``teacher_model_kind="base"`` (TRL's default): a frozen copy of the starting weights, which TRL re-loads
  from ``model.config._name_or_path``. The model must therefore come from a folder (or Hub id) holding exactly the
  starting weights; `train_sdft` checks the folder exists.
- precision: ``bf16`` resolved like `IDFTConfig` (`trl_onpolicy.trainer.idft_config.default_bf16_for_machine`): off without
  an accelerator, TRL's default (on) otherwise.
- bookkeeping: ``report_to="none"``, ``save_strategy="no"``, ``logging_steps=1``, ``gradient_checkpointing=False``
  (small models on CPU train faster without it; pass it in ``args`` to change), ``disable_tqdm`` left as is.
- ``max_completion_length`` (TRL: 256) and ``max_prompt_length`` (TRL: 512) are TRL's unless ``args`` sets them;
  on CPU pass a short ``max_completion_length`` (the student samples that many tokens per prompt every step).

Any key of ``args`` is an `SDFTConfig` field and overrides the above (unknown keys raise).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def privileged_context(row: dict) -> str:
    """The demonstration given to SDFT's teacher: ``solution`` when the row has it, else the completion's text."""
    solution = row.get("solution")
    if isinstance(solution, str) and solution.strip():
        return solution
    completion = row.get("completion")
    if isinstance(completion, str):
        text = completion
    elif isinstance(completion, list):
        text = "\n".join(str(m.get("content", "")) for m in completion if isinstance(m, dict))
    else:
        text = ""
    if not text.strip():
        raise ValueError("SDFT needs a reference solution per row: give a non-empty `solution` or `completion`.")
    return text


def sdft_dataset(rows: Sequence[dict]):
    """``datasets.Dataset`` with ``prompt`` (chat messages ending in a user turn) and ``privileged_context``."""
    from datasets import Dataset

    out = []
    for k, row in enumerate(rows):
        prompt = row.get("prompt")
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        if not (isinstance(prompt, list) and prompt and isinstance(prompt[-1], dict) and prompt[-1].get("role") == "user"):
            raise ValueError(f"SDFT row {k}: `prompt` must be a string or chat messages ending with a user turn.")
        out.append({"prompt": prompt, "privileged_context": privileged_context(row)})
    if not out:
        raise ValueError("SDFT needs at least one training row.")
    return Dataset.from_list(out)


def sdft_config(output_dir: str | os.PathLike, args: dict | None = None):
    """The `SDFTConfig` `train_sdft` uses (see the module docstring for every value it sets)."""
    from trl.experimental.sdft import SDFTConfig

    from trl_onpolicy.utils.device import default_bf16_for_machine

    args = dict(args or {})
    known = {f.name for f in dataclasses.fields(SDFTConfig)}
    unknown = sorted(set(args) - known)
    if unknown:
        raise ValueError(f"SDFT args {unknown} are not SDFTConfig fields; see trl.experimental.sdft.SDFTConfig.")
    values: dict[str, Any] = {
        "remove_unused_columns": False,
        "num_generations": 1,
        "report_to": "none",
        "save_strategy": "no",
        "logging_steps": 1,
        "gradient_checkpointing": False,
    }
    values.update(args)
    per_step = int(values.get("per_device_train_batch_size", 8)) * int(values.get("gradient_accumulation_steps", 1))
    if per_step % int(values["num_generations"]):
        raise ValueError(
            f"SDFT num_generations={values['num_generations']} must divide the samples per step "
            f"(per_device_train_batch_size x gradient_accumulation_steps = {per_step})."
        )

    # bf16 resolved the way IDFTConfig resolves it, before SDFTConfig's own __post_init__ sees it
    probe = SimpleNamespace(bf16=values.get("bf16"), fp16=bool(values.get("fp16", False)),
                            use_cpu=bool(values.get("use_cpu", False)))
    default_bf16_for_machine(probe)
    values["bf16"] = probe.bf16
    return SDFTConfig(output_dir=str(output_dir), **values)


def build_sdft_trainer(model, tokenizer, rows: Sequence[dict], args: dict | None, output_dir, callbacks=None):
    """The `SDFTTrainer` `train_sdft` runs (exposed for tests and for callers that want to add callbacks)."""
    from trl.experimental.sdft import SDFTTrainer

    source = getattr(model.config, "_name_or_path", None) or getattr(model, "name_or_path", None)
    if not source or not (Path(source).is_dir() or "/" in str(source)):
        raise ValueError(
            f"SDFT's teacher is the base model re-loaded from model.config._name_or_path={source!r}; load the model "
            "from a folder (or Hub id) that holds the starting weights."
        )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    config = sdft_config(output_dir, args)
    return SDFTTrainer(model=model, args=config, train_dataset=sdft_dataset(rows), processing_class=tokenizer,
                       callbacks=callbacks)


def train_sdft(model, tokenizer, rows: Sequence[dict], args: dict | None, output_dir):
    """Train ``model`` with SDFT on prompt-completion ``rows`` (reference solution = privileged context) and return
    the trained model (unwrapped, in eval mode). ``args``: `SDFTConfig` fields overriding this module's settings."""
    trainer = build_sdft_trainer(model, tokenizer, rows, args, output_dir)
    trainer.train()
    trained = trainer.accelerator.unwrap_model(trainer.model)
    return trained.eval()
