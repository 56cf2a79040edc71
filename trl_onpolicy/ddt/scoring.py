"""DDT diagnostics: how on-policy is a dataset for a model?

Distribution Discriminant Theory scores each completion token ``y_t`` with the centered log-likelihood
``phi_t = log p(y_t) + H(p_t)`` (`trl_onpolicy.losses.centered_log_likelihood`). Tokens the model itself would
sample have ``E[phi] = 0`` and ``Var[phi] = varentropy``; text written by someone else scores ``phi < 0``.

Layers, from pure math to I/O:

- `sample_statistics` / `corpus_summary`: pure functions from per-token arrays to per-sample and corpus aggregates.
- `encode_example` / `encode_dataset`: turn one row of any format TRL's `SFTTrainer` accepts into
  ``(input_ids, completion_mask)`` with TRL's own tokenization helpers (or take pre-tokenized ids as they are).
- `score_token_ids`: run the model's transformer body once per length-sorted batch and compute log p, entropy and
  varentropy of the scored tokens tile by tile over the vocabulary (`trl_onpolicy.ops.lm_head.token_statistics`): no
  ``[batch, time, vocabulary]`` logits are ever held.
- `score_dataset`: all of the above, data-parallel across processes (torchrun / accelerate) when launched so.
- `sample_own_responses`: the model's own temperature-1 responses to the dataset's prompts, for comparison.
- `filter_dataset`: keep or drop rows by a per-sample statistic.

Rows that cannot be scored are counted, never silently dropped; the reasons are the keys of `SKIP_REASONS`.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from trl_onpolicy.utils.distributed import distributed_state, gather_objects, is_main_process, local_indices
from trl_onpolicy.losses import centered_log_likelihood
from trl_onpolicy.ops.lm_head import backbone, lm_head_transform, token_statistics

THRESHOLDS = (-1.0, -3.0, -5.0)
PHI_QUANTILES = (0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99)
HIST_RANGE = (-12.0, 4.0)
HIST_BINS = 64

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


def frac_key(threshold: float) -> str:
    return f"frac_phi_gt_{threshold:g}"


class SkipSample(Exception):
    """Raised by `encode_example` for a row that cannot be scored; ``reason`` is a key of `SKIP_REASONS`."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


# ----------------------------------------------------------------------------------------------------------------
# pure statistics


def sample_statistics(phi: np.ndarray, varentropy: np.ndarray, thresholds: Sequence[float] = THRESHOLDS) -> dict:
    """Aggregates of one sample's completion tokens.

    ``z = sum(phi) / sqrt(sum(varentropy))``: for text sampled from the model the phi_t are martingale differences
    with conditional variance varentropy_t, so z is approximately standard normal; off-policy text gives z << 0.
    It is NaN when the sum of varentropies is 0 (a fully deterministic model).
    """
    phi = np.asarray(phi, dtype=np.float64)
    var = np.asarray(varentropy, dtype=np.float64)
    n = int(phi.size)
    total, total_var = float(phi.sum()), float(var.sum())
    out = {
        "num_tokens": n,
        "mean_phi": total / n if n else float("nan"),
        "sum_phi": total,
        "sum_varentropy": total_var,
        "z": total / math.sqrt(total_var) if total_var > 0 else float("nan"),
    }
    for t in thresholds:
        out[frac_key(t)] = float((phi > t).mean()) if n else float("nan")
    return out


def _quantiles(x: np.ndarray, qs: Sequence[float]) -> dict:
    if x.size == 0:
        return {f"q{int(round(q * 100)):02d}": float("nan") for q in qs}
    values = np.quantile(x, qs)
    return {f"q{int(round(q * 100)):02d}": float(v) for q, v in zip(qs, values)}


def histogram(x: np.ndarray, value_range=HIST_RANGE, bins: int = HIST_BINS) -> dict:
    """Counts over ``bins`` equal bins of ``value_range``; values outside are counted in ``below``/``above``."""
    x = np.asarray(x, dtype=np.float64)
    counts, edges = np.histogram(np.clip(x, *value_range), bins=bins, range=value_range)
    return {
        "edges": [float(e) for e in edges],
        "counts": [int(c) for c in counts],
        "below": int((x < value_range[0]).sum()),
        "above": int((x > value_range[1]).sum()),
    }


def corpus_summary(
    token_arrays: Sequence[dict | None],
    samples: Sequence[dict],
    thresholds: Sequence[float] = THRESHOLDS,
) -> dict:
    """Corpus aggregates from per-sample token arrays (``None`` for skipped rows) and per-sample records.

    Token-level figures (``mean_phi``, ``std_phi``, quantiles, threshold fractions, histogram) weight every
    completion token equally; ``mean_z``/``mean_sample_phi`` average over samples; ``corpus_z`` is the z statistic
    of the whole corpus taken as one sequence (approx. N(0, 1) for the model's own samples).
    """
    scored = [a for a in token_arrays if a is not None]
    cat = lambda key: np.concatenate([a[key] for a in scored]).astype(np.float64) if scored else np.zeros(0)  # noqa: E731
    phi, var, lp, ent = cat("phi"), cat("varentropy"), cat("log_probs"), cat("entropy")
    n = int(phi.size)
    nan = float("nan")
    skipped = Counter(s["skipped"] for s in samples if s.get("skipped"))
    zs = np.array([s["z"] for s in samples if not s.get("skipped") and np.isfinite(s["z"])], dtype=np.float64)
    means = np.array([s["mean_phi"] for s in samples if not s.get("skipped")], dtype=np.float64)
    summary = {
        "num_samples": len(scored),
        "num_rows": len(samples),
        "num_skipped": int(sum(skipped.values())),
        "skipped": dict(sorted(skipped.items())),
        "num_tokens": n,
        "mean_phi": float(phi.mean()) if n else nan,
        "std_phi": float(phi.std()) if n else nan,
        "min_phi": float(phi.min()) if n else nan,
        "max_phi": float(phi.max()) if n else nan,
        "phi_quantiles": _quantiles(phi, PHI_QUANTILES),
        "mean_log_prob": float(lp.mean()) if n else nan,
        "mean_entropy": float(ent.mean()) if n else nan,
        "mean_varentropy": float(var.mean()) if n else nan,
        "corpus_z": float(phi.sum() / math.sqrt(var.sum())) if n and var.sum() > 0 else nan,
        "mean_z": float(zs.mean()) if zs.size else nan,
        "std_z": float(zs.std()) if zs.size else nan,
        "z_quantiles": _quantiles(zs, PHI_QUANTILES),
        "mean_sample_phi": float(means.mean()) if means.size else nan,
        "std_sample_phi": float(means.std()) if means.size else nan,
        "sample_phi_quantiles": _quantiles(means, PHI_QUANTILES),
        "mean_tokens_per_sample": n / len(scored) if scored else nan,
    }
    for t in thresholds:
        summary[frac_key(t)] = float((phi > t).mean()) if n else nan
    summary["phi_histogram"] = histogram(phi)
    summary["sample_phi_histogram"] = histogram(means, value_range=(-6.0, 2.0), bins=64)
    return summary


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
        if self.fmt == "prompt_completion":
            if is_conversational(row):
                self._require_chat_template()
                return list(self._tokenize(row["prompt"], add_generation_prompt=True)["input_ids"])
            return list(self._tokenize(row["prompt"])["input_ids"])
        if self.fmt in ("messages", "conversations"):
            messages = row["messages"]
            last = max(i for i, m in enumerate(messages) if m.get("role") == "assistant")
            return list(self._tokenize(messages[:last], add_generation_prompt=True)["input_ids"])
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


# ----------------------------------------------------------------------------------------------------------------
# scoring


def _progress(iterable, desc: str, enabled: bool, total: int | None = None):
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, disable=not enabled, dynamic_ncols=True)


@torch.no_grad()
def score_token_ids(
    model,
    sequences: Sequence[Sequence[int]],
    masks: Sequence[Sequence[int]],
    *,
    batch_size: int = 8,
    max_tokens_per_batch: int | None = None,
    vocab_chunk: int | None = None,
    token_chunk: int | None = None,
    progress: bool = False,
    desc: str = "DDT scoring",
) -> list[dict[str, np.ndarray]]:
    """Per-token statistics of the masked tokens of each sequence, in input order.

    ``masks[i][j] = 1`` scores token ``j`` of sequence ``i`` (predicted from the tokens before it; position 0 is
    never scored). Sequences are sorted by length and batched (right padding); the transformer body runs once per
    batch and the LM head is applied in vocabulary tiles by `trl_onpolicy.ops.lm_head.token_statistics` to the scored positions
    only (``vocab_chunk`` / ``token_chunk``: None for the device's `trl_onpolicy.ops.lm_head.DEFAULT_TILES`).
    Returns, per sequence, float32 arrays ``phi``, ``log_probs``, ``entropy``, ``varentropy`` and int ``token_ids``,
    ``positions`` (index in the sequence).
    """
    if len(sequences) != len(masks):
        raise ValueError(f"{len(sequences)} sequences but {len(masks)} masks.")
    body = backbone(model)
    head = model.get_output_embeddings()
    weight, bias = head.weight, getattr(head, "bias", None)
    transform = lm_head_transform(model)
    device = weight.device
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    batches, current, width = [], [], 0
    for i in order:
        n = len(sequences[i])
        too_many = max_tokens_per_batch is not None and current and max(width, n) * (len(current) + 1) > max_tokens_per_batch
        if len(current) == batch_size or too_many:
            batches.append(current)
            current, width = [], 0
        current.append(i)
        width = max(width, n)
    if current:
        batches.append(current)

    results: list[dict | None] = [None] * len(sequences)
    was_training = model.training
    model.eval()
    try:
        for batch in _progress(batches, desc, progress):
            width = max(len(sequences[i]) for i in batch)
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            attn = torch.zeros(len(batch), width, dtype=torch.long)
            score = torch.zeros(len(batch), width, dtype=torch.bool)
            for r, i in enumerate(batch):
                n = len(sequences[i])
                ids[r, :n] = torch.as_tensor(list(sequences[i]), dtype=torch.long)
                attn[r, :n] = 1
                score[r, :n] = torch.as_tensor(list(masks[i]), dtype=torch.long) != 0
            score[:, 0] = False
            ids, attn, score = ids.to(device), attn.to(device), score.to(device)
            hidden = body(input_ids=ids, attention_mask=attn, use_cache=False).last_hidden_state
            pred = score[:, 1:]  # hidden state at j-1 predicts token j
            h = hidden[:, :-1][pred]
            targets = ids[:, 1:][pred]
            stats = token_statistics(h, weight, targets, bias, vocab_chunk=vocab_chunk, token_chunk=token_chunk, **transform)
            phi = centered_log_likelihood(stats["log_probs"], stats["entropy"])
            counts = pred.sum(1).tolist()
            cols = {
                "phi": phi,
                "log_probs": stats["log_probs"],
                "entropy": stats["entropy"],
                "varentropy": stats["varentropy"],
                "token_ids": targets,
            }
            cols = {k: v.cpu().numpy() for k, v in cols.items()}
            positions = pred.nonzero()[:, 1].cpu().numpy() + 1
            start = 0
            for r, i in enumerate(batch):
                sl = slice(start, start + counts[r])
                results[i] = {k: v[sl] for k, v in cols.items()} | {"positions": positions[sl]}
                start += counts[r]
    finally:
        model.train(was_training)
    return results  # type: ignore[return-value]


def worst_tokens(arrays: dict, tokenizer, k: int) -> list[dict]:
    """The ``k`` completion tokens with the lowest phi: decoded text, phi, log p, entropy and index in the completion."""
    if k <= 0 or arrays["phi"].size == 0:
        return []
    idx = np.argsort(arrays["phi"], kind="stable")[:k]
    out = []
    for j in idx:
        out.append(
            {
                "token": tokenizer.decode([int(arrays["token_ids"][j])]) if tokenizer is not None else None,
                "token_id": int(arrays["token_ids"][j]),
                "index": int(j),
                "phi": float(arrays["phi"][j]),
                "log_prob": float(arrays["log_probs"][j]),
                "entropy": float(arrays["entropy"][j]),
            }
        )
    return out


@dataclass
class DDTResult:
    """Output of `score_dataset`.

    ``samples``: one record per input row, in input order (``index``; ``skipped`` is a reason for unscored rows,
    else None; the statistics of `sample_statistics`; ``worst_tokens``). ``tokens``: per row, the per-token arrays
    of `score_token_ids` (None when skipped). ``summary``: `corpus_summary`.
    """

    summary: dict
    samples: list[dict]
    tokens: list[dict | None]

    def write_samples(self, path) -> None:
        """One JSON object per row (NaN written as null)."""
        with open(path, "w") as f:
            for s in self.samples:
                f.write(json.dumps(_json_safe(s)) + "\n")


def _json_safe(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        return _json_safe(obj.item())
    return obj


def score_dataset(
    model,
    tokenizer,
    dataset,
    *,
    max_length: int | None = 1024,
    batch_size: int = 8,
    max_tokens_per_batch: int | None = None,
    top_k_tokens: int = 5,
    dataset_text_field: str = "text",
    vocab_chunk: int | None = None,
    token_chunk: int | None = None,
    progress: bool = True,
    desc: str = "DDT scoring",
) -> DDTResult:
    """Score every row of ``dataset`` (a `datasets.Dataset` or a list of dicts) under ``model``.

    Accepts the formats of TRL's SFTTrainer (see `Encoder`); rows that cannot be scored are recorded with a reason
    from `SKIP_REASONS` and counted in ``summary["skipped"]``. Under ``torchrun``/``accelerate launch`` with several
    processes, rows are split across processes (strided) and the results gathered, so every process returns the
    full result. The model should already be on its device; it is used in eval mode without gradients.

    Raises ValueError for problems that concern the whole dataset: unknown format / missing columns, a conversational
    dataset with a tokenizer lacking a chat template, a tokenizer whose ids do not fit the model's vocabulary.
    """
    rows = dataset if isinstance(dataset, list) else None
    columns = list(rows[0].keys()) if rows else list(dataset.column_names)
    n_rows = len(dataset)
    if n_rows == 0:
        raise ValueError("The dataset is empty.")
    fmt = detect_format(columns, dataset_text_field)
    check_tokenizer_fits(model, tokenizer)
    encoder = Encoder(tokenizer, fmt, dataset_text_field, max_length, output_vocab_size(model))
    local = local_indices(n_rows)
    show = progress and is_main_process()

    sequences, masks, kept, skipped = [], [], [], {}
    for i in _progress(local, "DDT tokenizing", show):
        try:
            ids, mask = encoder(dataset[i])
        except SkipSample as skip:
            skipped[i] = skip.reason
            continue
        sequences.append(ids)
        masks.append(mask)
        kept.append(i)
    arrays = score_token_ids(
        model, sequences, masks, batch_size=batch_size, max_tokens_per_batch=max_tokens_per_batch,
        vocab_chunk=vocab_chunk, token_chunk=token_chunk, progress=show, desc=desc,
    )
    local_records = []
    for i, a in zip(kept, arrays):
        record = {"index": i, "skipped": None} | sample_statistics(a["phi"], a["varentropy"])
        record["mean_log_prob"] = float(a["log_probs"].mean())
        record["mean_entropy"] = float(a["entropy"].mean())
        record["worst_tokens"] = worst_tokens(a, tokenizer, top_k_tokens)
        local_records.append((record, a))
    for i, reason in skipped.items():
        local_records.append(({"index": i, "skipped": reason}, None))

    gathered = sorted(gather_objects(local_records), key=lambda x: x[0]["index"])
    samples = [r for r, _ in gathered]
    tokens = [a for _, a in gathered]
    return DDTResult(summary=corpus_summary(tokens, samples), samples=samples, tokens=tokens)


# ----------------------------------------------------------------------------------------------------------------
# the model's own responses


@torch.no_grad()
def sample_own_responses(
    model,
    tokenizer,
    dataset,
    *,
    max_new_tokens: int = 256,
    batch_size: int = 8,
    temperature: float = 1.0,
    seed: int = 0,
    dataset_text_field: str = "text",
    progress: bool = True,
) -> list[dict]:
    """Sample the model's own response to each row's prompt (plain ancestral sampling: no top-k, top-p or penalties).

    Returns one ``{"index", "prompt_ids", "completion_ids"}`` per row with a non-empty prompt, in input order; the completion
    ends with the EOS token when the model stopped on its own. Scoring these ids (pre-tokenized format) gives the
    model's own phi distribution: mean phi ~ 0 at temperature 1. Data-parallel like `score_dataset`.
    """
    from trl_onpolicy.utils.generation import generate_ids

    columns = list(dataset[0].keys()) if isinstance(dataset, list) else list(dataset.column_names)
    encoder = Encoder(tokenizer, detect_format(columns, dataset_text_field))
    local = local_indices(len(dataset))
    prompts = []
    for i in local:
        try:
            ids = encoder.prompt_ids(dataset[i])
        except (KeyError, TypeError, ValueError) as err:
            if isinstance(err, ValueError) and "needs prompts" in str(err):
                raise
            continue  # a row without a usable prompt (it is also skipped, with its reason, when scored)
        if ids:
            prompts.append((i, ids))
    state = distributed_state()
    torch.manual_seed(seed + (state.process_index if state else 0))
    prompts.sort(key=lambda x: -len(x[1]))
    out = []
    chunks = [prompts[s : s + batch_size] for s in range(0, len(prompts), batch_size)]
    for chunk in _progress(chunks, "sampling own responses", progress and is_main_process()):
        outs = generate_ids(model, tokenizer, [p for _, p in chunk], max_new_tokens=max_new_tokens,
                            temperature=temperature, top_p=1.0)
        out.extend({"index": i, "prompt_ids": p, "completion_ids": ids} for (i, p), (ids, _) in zip(chunk, outs))
    return sorted(gather_objects(out), key=lambda x: x["index"])


# ----------------------------------------------------------------------------------------------------------------
# filtering

FILTER_STATISTICS = ("mean_phi", "z", "sum_phi", "num_tokens") + tuple(frac_key(t) for t in THRESHOLDS)


def filter_mask(
    samples: Sequence[dict],
    by: str = "mean_phi",
    min_value: float | None = None,
    max_value: float | None = None,
    *,
    invert: bool = False,
    keep_unscored: bool = False,
) -> list[bool]:
    """Which rows to keep: those whose statistic ``by`` lies in ``[min_value, max_value]`` (``invert`` keeps the
    others). Unscored rows (skipped, or a NaN statistic) are dropped unless ``keep_unscored``."""
    if by not in FILTER_STATISTICS:
        raise ValueError(f"Cannot filter by {by!r}; choose one of {FILTER_STATISTICS}.")
    if min_value is None and max_value is None:
        raise ValueError("Give min_value and/or max_value to filter by.")
    if min_value is not None and max_value is not None and min_value > max_value:
        raise ValueError(f"min_value={min_value} is larger than max_value={max_value}.")
    keep = []
    for s in samples:
        value = s.get(by) if not s.get("skipped") else None
        if value is None or (isinstance(value, float) and not math.isfinite(value)):
            keep.append(keep_unscored)
            continue
        inside = (min_value is None or value >= min_value) and (max_value is None or value <= max_value)
        keep.append(inside != invert)
    return keep


def filter_dataset(dataset, samples: Sequence[dict] | DDTResult, **criteria):
    """Keep the rows of ``dataset`` selected by `filter_mask` (same columns, same order).

    ``samples`` are the per-row records of `score_dataset` (or a `DDTResult`), aligned with the rows by ``index``.
    Returns ``(filtered_dataset, report)``; the report counts ``num_rows``, ``kept``, ``dropped`` and
    ``dropped_unscored``.
    """
    if isinstance(samples, DDTResult):
        samples = samples.samples
    samples = sorted(samples, key=lambda s: s["index"])
    if len(samples) != len(dataset) or any(s["index"] != i for i, s in enumerate(samples)):
        raise ValueError(
            f"The scores cover {len(samples)} rows but the dataset has {len(dataset)}: score the same dataset "
            "(without --num_samples) before filtering it."
        )
    keep = filter_mask(samples, **criteria)
    unscored = sum(1 for s, k in zip(samples, keep) if not k and (s.get("skipped") or not _finite(s.get(criteria.get("by", "mean_phi")))))
    indices = [i for i, k in enumerate(keep) if k]
    filtered = [dataset[i] for i in indices] if isinstance(dataset, list) else dataset.select(indices)
    report = {
        "num_rows": len(samples),
        "kept": len(indices),
        "dropped": len(samples) - len(indices),
        "dropped_unscored": unscored,
        "criteria": {k: v for k, v in criteria.items()},
    }
    return filtered, report


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


# ----------------------------------------------------------------------------------------------------------------
# plot


def plot_phi_distribution(path, result: DDTResult, own: DDTResult | None = None, title: str | None = None) -> None:
    """PNG: token-level phi histogram (left) and per-sample mean phi histogram (right), corpus vs own samples."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    series = [("corpus", result, "tab:blue")] + ([("own samples (T=1)", own, "tab:orange")] if own else [])
    for label, res, color in series:
        tok = [a["phi"] for a in res.tokens if a is not None]
        phi = np.clip(np.concatenate(tok), *HIST_RANGE) if tok else np.zeros(0)
        s = res.summary
        axes[0].hist(phi, bins=HIST_BINS, range=HIST_RANGE, density=True, alpha=0.5, color=color,
                     label=f"{label}: mean {s['mean_phi']:.3f}, std {s['std_phi']:.2f}, n={s['num_tokens']}")
        means = [r["mean_phi"] for r in res.samples if not r.get("skipped")]
        axes[1].hist(means, bins=40, alpha=0.5, color=color, label=f"{label}: mean z {s['mean_z']:.2f}")
    axes[0].axvline(0, color="k", lw=0.8)
    axes[0].set_yscale("log")
    axes[0].set_xlabel("phi = log p + H per completion token (clipped)")
    axes[0].set_ylabel("density (log scale)")
    axes[0].legend(fontsize=8)
    axes[1].axvline(0, color="k", lw=0.8)
    axes[1].set_xlabel("mean phi per sample")
    axes[1].set_ylabel("samples")
    axes[1].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
