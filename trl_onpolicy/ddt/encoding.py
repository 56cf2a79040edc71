"""DDT tokenization: one row of any dataset format TRL's `SFTTrainer` accepts -> ``(input_ids, completion_mask)``,
with TRL's own tokenization helpers (or pre-tokenized ids taken as they are); prompts alone through THE prompt
renderer (`trl_onpolicy.data.prompts.render_prompt_ids`).

Rows that cannot be scored raise `SkipSample` with a reason from `SKIP_REASONS`; they are counted, never silently
dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from trl_onpolicy.data.prompts import last_assistant_index, render_prompt_ids

# reason -> what it means; every skipped row is counted under one of these in the summary's "skipped"
SKIP_REASONS = {
    "empty_completion": "the completion (or every assistant turn) is empty: there is no token to score",
    "too_long": "prompt + completion is longer than max_length tokens (rows are skipped, not truncated)",
    "token_out_of_vocab": "a pre-tokenized id is negative or not smaller than the model's output vocabulary size",
    "invalid_row": "a required field is missing or None, or has the wrong type",
}

# dataset formats, checked in this order (TRL's names)
FORMATS = {
    "prompt_completion_ids": ("prompt_ids", "completion_ids"),
    "input_ids": ("input_ids",),
    "prompt_completion": ("prompt", "completion"),
    "messages": ("messages",),
    "conversations": ("conversations",),
    "text": ("text",),
}


class SkipSample(Exception):
    """Raised by `Encoder` for a row that cannot be scored; ``reason`` is a key of `SKIP_REASONS`."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail



# ----------------------------------------------------------------------------------------------------------------
# dataset formats and tokenization (mirrors trl.SFTTrainer._prepare_dataset)


def detect_format(column_names: Sequence[str], dataset_text_field: str = "text") -> str:
    """Name of the dataset format (a key of `FORMATS`), or a ValueError that lists what is accepted."""
    columns = set(column_names)
    for name, required in FORMATS.items():
        required = (dataset_text_field,) if name == "text" else required
        if set(required) <= columns:
            return name
    if "prompt" in columns or "completion" in columns:
        missing = {"prompt", "completion"} - columns
        raise ValueError(f"The dataset has a prompt-completion column but lacks {sorted(missing)}; columns: {sorted(columns)}.")
    if "prompt_ids" in columns or "completion_ids" in columns:
        raise ValueError(f"Pre-tokenized prompt-completion data needs both `prompt_ids` and `completion_ids`; columns: {sorted(columns)}.")
    raise ValueError(
        f"Cannot score a dataset with columns {sorted(columns)}. Accepted formats (as TRL's SFTTrainer): "
        "`prompt` + `completion` (plain strings or conversational message lists), `messages` (assistant turns are "
        f"scored), `conversations` (ShareGPT from/value), `{dataset_text_field}` (every token is scored; change the "
        "column with dataset_text_field), or pre-tokenized `prompt_ids` + `completion_ids` / `input_ids` "
        "(+ optional `labels`, `assistant_masks` or `completion_mask`)."
    )


@dataclass
class Encoder:
    """Turns dataset rows into ``(input_ids, completion_mask)`` the way TRL's SFTTrainer tokenizes them.

    - prompt-completion: prompt rendered with the generation prompt, completion = the tokens after the common prefix
      of ``tok(prompt)`` and ``tok(prompt + completion)`` (`trl.data_utils.common_prefix_length`); plain text gets
      the EOS appended to the completion, as SFTTrainer does.
    - ``messages``: the assistant turns are scored, located with TRL's ``{% generation %}`` training template when
      the tokenizer's template has (or TRL can patch in) the markers, else by rendering the conversation turn by turn.
    - ``text``: every token after the first (plus the appended EOS) is scored.
    - pre-tokenized: ``prompt_ids`` + ``completion_ids``; or ``input_ids`` scored exactly where TRL trains: ``labels``
      != -100 when the row has labels (SFTTrainer's prepared datasets do), else where ``assistant_masks`` and
      ``completion_mask`` are both 1 (each if present), else every token.
    """

    tokenizer: Any
    fmt: str
    dataset_text_field: str = "text"
    max_length: int | None = None
    vocab_size: int | None = None  # model output vocabulary, for the pre-tokenized id check
    chat_template: str | None = field(default=None, init=False)
    _assistant_mode: str | None = field(default=None, init=False)

    def __post_init__(self):
        if self.fmt == "messages" or self.fmt == "conversations":
            self._require_chat_template()
            from trl.chat_template_utils import get_training_chat_template, has_generation_markers

            if has_generation_markers(self.tokenizer.chat_template):
                self._assistant_mode = "markers"
            else:
                try:
                    self.chat_template = get_training_chat_template(self.tokenizer)
                    self._assistant_mode = "markers"
                except ValueError:  # a template TRL cannot patch: find turns by incremental rendering
                    self._assistant_mode = "incremental"

    def _require_chat_template(self):
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise ValueError(
                "The dataset is conversational but the tokenizer has no chat template. Use the model's instruct "
                "tokenizer, set `tokenizer.chat_template`, or copy one with `trl.clone_chat_template`."
            )

    def __call__(self, row: dict) -> tuple[list[int], list[int]]:
        from trl.data_utils import is_conversational_from_value, maybe_convert_to_chatml

        if self.fmt == "conversations" and is_conversational_from_value(row):
            row = maybe_convert_to_chatml(dict(row))
        encode = {
            "prompt_completion_ids": self._ids_prompt_completion,
            "input_ids": self._ids_input,
            "prompt_completion": self._prompt_completion,
            "messages": self._messages,
            "conversations": self._messages,
            "text": self._text,
        }[self.fmt]
        try:
            ids, mask = encode(row)
        except SkipSample:
            raise
        except (KeyError, TypeError, AttributeError) as err:
            raise SkipSample("invalid_row", repr(err)) from err
        ids, mask = [int(i) for i in ids], [int(m) for m in mask]
        if sum(mask[1:]) == 0:  # the first token has no context and is never scored
            raise SkipSample("empty_completion")
        if self.max_length is not None and len(ids) > self.max_length:
            raise SkipSample("too_long", f"{len(ids)} > max_length={self.max_length}")
        return ids, mask

    # --- formats
    def _check_ids(self, ids):
        if any(v is None for v in ids):
            raise SkipSample("invalid_row", "None inside token ids")
        bad = [int(i) for i in ids if int(i) < 0 or (self.vocab_size is not None and int(i) >= self.vocab_size)]
        if bad:
            raise SkipSample("token_out_of_vocab", f"ids {bad[:5]} outside [0, {self.vocab_size})")

    def _ids_prompt_completion(self, row):
        prompt, completion = list(row["prompt_ids"]), list(row["completion_ids"])
        self._check_ids(prompt + completion)
        return prompt + completion, [0] * len(prompt) + [1] * len(completion)

    def _ids_input(self, row):
        ids = list(row["input_ids"])
        self._check_ids(ids)
        return ids, self._input_mask(row, len(ids))

    @staticmethod
    def _input_mask(row, n: int) -> list[int]:
        """Which tokens of a pre-tokenized row TRL trains, hence which DDT scores: ``labels`` when present (-100 = not
        trained; the label itself must be the token, as SFTTrainer's labels are), else the product of
        ``assistant_masks`` and ``completion_mask`` (SFTTrainer's own rule when it builds labels), else every token."""
        labels = row.get("labels")
        if labels is not None:
            labels = list(labels)
            if len(labels) != n:
                raise SkipSample("invalid_row", "labels and input_ids differ in length")
            ids = row["input_ids"]
            if any(lab != -100 and int(lab) != int(t) for lab, t in zip(labels, ids)):
                raise SkipSample("invalid_row", "labels must be -100 or the token id itself (not shifted)")
            return [int(lab != -100) for lab in labels]
        mask = [1] * n
        for column in ("assistant_masks", "completion_mask"):
            value = row.get(column)
            if value is None:
                continue
            value = list(value)
            if len(value) != n:
                raise SkipSample("invalid_row", f"{column} and input_ids differ in length")
            mask = [int(bool(a) and bool(b)) for a, b in zip(mask, value)]
        return mask

    def _tokenize(self, value, **kwargs) -> dict:
        from trl.data_utils import _tokenize

        if isinstance(value, list):
            kwargs.setdefault("chat_template", self.chat_template)
            return _tokenize(self.tokenizer, value, **kwargs)
        return _tokenize(self.tokenizer, value)

    def _prompt_completion(self, row):
        from trl.data_utils import common_prefix_length, is_conversational

        prompt, completion = row["prompt"], row["completion"]
        if prompt is None or completion is None:
            raise SkipSample("invalid_row", "prompt or completion is None")
        if is_conversational(row):
            self._require_chat_template()
            if not completion or not any(m.get("content") for m in completion):
                raise SkipSample("empty_completion")
            prompt_ids = self._tokenize(prompt, add_generation_prompt=True)["input_ids"]
            full_ids = self._tokenize(prompt + completion)["input_ids"]
        else:
            if not isinstance(prompt, str) or not isinstance(completion, str):
                raise SkipSample("invalid_row", "prompt and completion must both be strings or both message lists")
            if completion == "":
                raise SkipSample("empty_completion")
            completion = self._with_eos(completion)
            prompt_ids = self._tokenize(prompt)["input_ids"]
            full_ids = self._tokenize(prompt + completion)["input_ids"]
        start = common_prefix_length(prompt_ids, full_ids)
        return full_ids, [0] * start + [1] * (len(full_ids) - start)

    def _with_eos(self, text: str) -> str:
        """``text`` ending in the tokenizer's EOS, as SFTTrainer appends it to plain-text completions."""
        eos = self.tokenizer.eos_token
        return text + eos if eos and not text.endswith(eos) else text

    def _text(self, row):
        text = row[self.dataset_text_field]
        if not isinstance(text, str):
            raise SkipSample("invalid_row", f"`{self.dataset_text_field}` is not a string")
        if text == "":
            raise SkipSample("empty_completion")
        text = self._with_eos(text)
        ids = self._tokenize(text)["input_ids"]
        return ids, [1] * len(ids)

    def _messages(self, row):
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            raise SkipSample("invalid_row", "`messages` is not a non-empty list of messages")
        if not any(m.get("role") == "assistant" and m.get("content") for m in messages):
            raise SkipSample("empty_completion", "no non-empty assistant turn")
        if self._assistant_mode == "markers":
            out = self._tokenize(messages, return_assistant_tokens_mask=True)
            return out["input_ids"], out["assistant_masks"]
        # incremental: the tokens a turn adds after the generation prompt of its context are the assistant's
        from trl.data_utils import common_prefix_length

        full = self._tokenize(messages)["input_ids"]
        mask = [0] * len(full)
        for i, message in enumerate(messages):
            if message.get("role") != "assistant":
                continue
            context = self._tokenize(messages[:i], add_generation_prompt=True)["input_ids"] if i else []
            upto = self._tokenize(messages[: i + 1])["input_ids"]
            start = common_prefix_length(context, upto)
            end = common_prefix_length(upto, full)
            for j in range(start, end):
                mask[j] = 1
        return full, mask

    def prompt_ids(self, row: dict) -> list[int]:
        """Token ids of the prompt alone (with the generation prompt), for sampling the model's own response."""
        from trl.data_utils import is_conversational, is_conversational_from_value, maybe_convert_to_chatml

        if self.fmt == "conversations" and is_conversational_from_value(row):
            row = maybe_convert_to_chatml(dict(row))
        if self.fmt == "prompt_completion_ids":
            return [int(i) for i in row["prompt_ids"]]
        # rendered as the scored rows are (`_tokenize`): the row's chat template, no tools / chat_template_kwargs
        if self.fmt == "prompt_completion":
            if is_conversational(row):
                self._require_chat_template()
            return render_prompt_ids(self.tokenizer, row["prompt"], chat_template=self.chat_template)
        if self.fmt in ("messages", "conversations"):
            messages = row["messages"]
            last = last_assistant_index(messages)
            if last is None:
                raise ValueError("a `messages` row has no assistant turn, so it has no prompt to render.")
            return render_prompt_ids(self.tokenizer, messages[:last], chat_template=self.chat_template)
        if self.fmt == "input_ids" and any(row.get(c) is not None for c in ("labels", "assistant_masks", "completion_mask")):
            mask = self._input_mask(row, len(row["input_ids"]))
            start = mask.index(1) if 1 in mask else len(mask)
            return [int(i) for i in row["input_ids"][:start]]
        raise ValueError(
            f"Sampling the model's own responses needs prompts; a `{self.fmt}` dataset has none "
            "(use prompt-completion, messages, or pre-tokenized prompt_ids/completion_ids)."
        )


def output_vocab_size(model) -> int:
    return int(model.get_output_embeddings().weight.shape[0])


def check_tokenizer_fits(model, tokenizer) -> None:
    """Refuse a tokenizer that produces ids the model has no output row for. A model vocabulary larger than the
    tokenizer's (Qwen pads its embedding matrix) is normal and accepted."""
    vocab = output_vocab_size(model)
    if len(tokenizer) > vocab:
        raise ValueError(
            f"The tokenizer has {len(tokenizer)} tokens but the model's output layer only {vocab}: its ids do not "
            "fit the model's vocabulary. Use the tokenizer that belongs to the model (or resize the model's "
            "embeddings after adding tokens)."
        )


def check_some_row_scores(model, tokenizer, dataset, *, max_length: int | None, dataset_text_field: str = "text",
                          max_length_name: str = "max_length") -> None:
    """Refuse, before any scoring, a dataset of which no row can be scored (every row too long for ``max_length``,
    or with an empty completion...): the run would write an empty summary. Stops at the first row that encodes, so
    a normal dataset costs one tokenization."""
    n_rows = len(dataset)
    if n_rows == 0:
        raise ValueError("The dataset is empty.")
    columns = list(dataset[0].keys()) if isinstance(dataset, list) else list(dataset.column_names)
    encoder = Encoder(tokenizer, detect_format(columns, dataset_text_field), dataset_text_field, max_length,
                      output_vocab_size(model))
    reasons: dict[str, int] = {}
    for i in range(n_rows):
        try:
            encoder(dataset[i])
            return
        except SkipSample as skip:
            reasons[skip.reason] = reasons.get(skip.reason, 0) + 1
    hint = f"; raise {max_length_name}" if "too_long" in reasons else ""
    raise ValueError(f"none of the {n_rows} rows can be scored ({', '.join(f'{k}: {v}' for k, v in reasons.items())}"
                     f"{hint}; see ddt.SKIP_REASONS).")

