"""THE prompt renderer: token ids of a prompt exactly as `trl.SFTTrainer` tokenizes a training prompt.

Training (through TRL), online decoding, `realign`, DDT, evaluation and the forgetting measures all render prompts
here, so the ids a model is trained after are the ids it is sampled, scored and evaluated after:

- a conversational prompt (a list of ``{"role", "content"}`` messages, system and earlier turns included) goes
  through ``tokenizer.apply_chat_template(..., add_generation_prompt=True)`` with the trainer's chat template (when
  one is given), the row's ``tools`` (a JSON string is decoded) and its ``chat_template_kwargs``;
- a text prompt is tokenized as it is (``tokenizer(text=prompt)``, special tokens as the tokenizer adds them).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence


def is_conversation(prompt) -> bool:
    """Whether ``prompt`` is a list of chat messages (dicts with a ``role``)."""
    return isinstance(prompt, (list, tuple)) and len(prompt) > 0 and all(
        isinstance(m, Mapping) and "role" in m for m in prompt)


def last_assistant_index(messages) -> int | None:
    """Index of the last ``assistant`` message of a conversation (None when it has none)."""
    return max((i for i, m in enumerate(messages or []) if m.get("role") == "assistant"), default=None)


def render_prompt_ids(tokenizer, prompt, *, chat_template: str | None = None, example: Mapping | None = None,
                      add_generation_prompt: bool = True) -> list[int]:
    """Token ids of ``prompt`` (text, or chat messages) as SFTTrainer tokenizes it; ``example`` is the dataset row the
    prompt came from (its ``tools`` and ``chat_template_kwargs`` are passed to the chat template)."""
    if isinstance(prompt, str):
        return list(tokenizer(text=prompt)["input_ids"])
    if not is_conversation(prompt):
        raise ValueError(f"A prompt must be a string or a list of chat messages ({{'role': ..., 'content': ...}}); got "
                         f"{type(prompt).__name__}.")
    if chat_template is None and getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            "The tokenizer has no chat template, so conversational prompts cannot be built. Use a chat model, set "
            "tokenizer.chat_template, or give plain-text prompts."
        )
    example = example or {}
    tools = example.get("tools")
    tools = json.loads(tools) if isinstance(tools, str) else tools
    kwargs = {"chat_template": chat_template, "tools": tools, **(example.get("chat_template_kwargs") or {})}
    out = tokenizer.apply_chat_template([dict(m) for m in prompt], tokenize=True, return_dict=True,
                                        add_generation_prompt=add_generation_prompt, **kwargs)
    return list(out["input_ids"])


def render_prompts_ids(tokenizer, prompts: Sequence, **kwargs) -> list[list[int]]:
    return [render_prompt_ids(tokenizer, p, **kwargs) for p in prompts]
