"""DDT diagnostics: how on-policy is a dataset for a model?

Distribution Discriminant Theory scores each completion token ``y_t`` with the centered log-likelihood
``phi_t = log p(y_t) + H(p_t)`` (`trl_onpolicy.losses.centered_log_likelihood`). Tokens the model itself would
sample have ``E[phi] = 0`` and ``Var[phi] = varentropy``; text written by someone else scores ``phi < 0``.

Layers, from pure math to I/O:

- `trl_onpolicy.ddt.statistics`: pure functions from per-token arrays to per-sample and corpus aggregates.
- `trl_onpolicy.ddt.encoding`: turn one row of any format TRL's `SFTTrainer` accepts into
  ``(input_ids, completion_mask)`` with TRL's own tokenization helpers (or take pre-tokenized ids as they are).
- `score_token_ids`: run the model's transformer body once per length-sorted batch and compute log p, entropy and
  varentropy of the scored tokens tile by tile over the vocabulary (`trl_onpolicy.ops.lm_head.token_statistics`): no
  ``[batch, time, vocabulary]`` logits are ever held.
- `score_dataset`: all of the above, data-parallel across processes (torchrun / accelerate) when launched so.
- `sample_own_responses`: the model's own temperature-1 responses to the dataset's prompts, for comparison.
- `trl_onpolicy.ddt.filter` / `trl_onpolicy.ddt.plot`: keep or drop rows by a per-sample statistic; the PNG.

Rows that cannot be scored are counted, never silently dropped; the reasons are the keys of `SKIP_REASONS`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from trl_onpolicy.ddt.encoding import Encoder, SkipSample, check_tokenizer_fits, detect_format, output_vocab_size
from trl_onpolicy.ddt.statistics import corpus_summary, json_safe, sample_statistics, worst_tokens
from trl_onpolicy.losses import centered_log_likelihood
from trl_onpolicy.ops.lm_head import backbone, full_tensor, lm_head_transform, token_statistics
from trl_onpolicy.utils.distributed import distributed_state, gather_objects, is_main_process, local_indices

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
    # FSDP2: the head's DTensor shards are gathered once here; the embeddings and the final norm are FSDP modules of
    # their own (accelerate's layout), which gather their parameters when the backbone calls them
    weight, bias = full_tensor(head.weight), full_tensor(getattr(head, "bias", None))
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
            stats = token_statistics(h, weight, targets, bias, vocab_chunk=vocab_chunk, token_chunk=token_chunk,
                                     **transform)
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
                f.write(json.dumps(json_safe(s)) + "\n")



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

