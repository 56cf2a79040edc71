"""Forward-only measures of how far a fine-tuned model moved from its base model, and of in-domain learning.

- `sample_base_responses`: responses the BASE model samples at temperature 1 (no top-p, no top-k) for some prompts,
  rendered with the chat template exactly as evaluation renders them (`trl_onpolicy.eval.evaluation.render_prompts`,
  `trl_onpolicy.eval.evaluation.generate_batched`).
- `kl_to_base`: the forward KL(base || trained) per response token on those samples. At every response position t
  (context x, y_<t drawn from the base model) it takes the exact divergence of the two next-token distributions,

      KL_t = sum_v p_base(v | x, y_<t) * (log p_base(v | x, y_<t) - log p_trained(v | x, y_<t)),

  summed over the whole vocabulary rather than estimated from the one sampled token (the single-sample log-ratio
  ``log p_base(y_t) - log p_trained(y_t)`` has the same expectation and a much larger variance). Averaged over the
  sampled responses' tokens this estimates E_{y ~ base}[ sum_t KL_t ] / E[|y|], the per-token forward KL of RL's Razor
  (Shenfeld, Pari, Agrawal, arXiv 2509.04259), which predicts forgetting. `base_hidden_states` caches the base
  model's side once per study, so each trained model then costs one transformer forward.
- `heldout_nll`: per-token negative log-likelihood of reference completions given their prompts (completion tokens
  only, tokenized the way TRL's SFTTrainer tokenizes prompt-completion rows: `trl_onpolicy.ddt.scoring.Encoder`).

Intervals: the prompt is the independent unit. Each returns per-prompt values and a 95% normal interval of their
mean (``mean +- 1.96 sd / sqrt(n)``), next to the token-weighted mean that is the headline number.

Memory: each transformer body runs once per batch; the LM heads are applied to the response positions only, in token
chunks of ``token_chunk`` rows, so at most two ``[token_chunk, vocab]`` float32 tiles (base and trained) exist at a time,
never the ``[batch, length, vocab]`` logits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from trl_onpolicy.eval.evaluation import Z95, generate_batched, render_prompts
from trl_onpolicy.ops.lm_head import backbone, lm_head_transform


def _interval(values: Sequence[float]) -> tuple[float, float]:
    """Normal 95% interval of the mean of ``values`` (not clipped: KL and NLL are not proportions)."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    mean = sum(values) / n
    if n == 1:
        return mean, mean
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = Z95 * sd / math.sqrt(n)
    return mean - half, mean + half


def _summary(per_prompt_sums: list[float], per_prompt_tokens: list[int], key: str) -> dict:
    """Token-weighted mean, per-prompt means with their interval, and counts (prompts without tokens are skipped)."""
    kept = [(s, n) for s, n in zip(per_prompt_sums, per_prompt_tokens) if n > 0]
    tokens = sum(n for _, n in kept)
    per_prompt = [s / n if n > 0 else None for s, n in zip(per_prompt_sums, per_prompt_tokens)]
    means = [s / n for s, n in kept]
    low, high = _interval(means)
    return {
        key: (sum(s for s, _ in kept) / tokens) if tokens else float("nan"),
        f"{key}_prompt_mean": (sum(means) / len(means)) if means else float("nan"),
        "ci_low": low,
        "ci_high": high,
        "ci_method": f"normal over {len(means)} per-prompt means",
        "per_prompt": per_prompt,
        "num_prompts": len(means),
        "num_tokens": tokens,
    }


def _encode_prompts(tokenizer, prompts: Sequence) -> list[list[int]]:
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in render_prompts(tokenizer, prompts)]


@torch.no_grad()
def sample_base_responses(
    model,
    tokenizer,
    prompts: Sequence,
    max_new_tokens: int = 64,
    seed: int = 0,
    batch_size: int = 16,
    *,
    progress: bool = True,
) -> list[list[int]]:
    """One response per prompt sampled from ``model`` (the base model) at temperature 1, no top-p and no top-k, as
    token ids (ending with the EOS id when the model stopped, else ``max_new_tokens`` long), in input order.

    Prompts are strings or chat messages, rendered like evaluation renders them. Rows are sorted by prompt length and
    batched; batch b is seeded with ``seed + b``, so the samples repeat for the same inputs.
    """
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size={batch_size} and max_new_tokens={max_new_tokens} must both be >= 1.")
    results = generate_batched(model, tokenizer, _encode_prompts(tokenizer, prompts), max_new_tokens=max_new_tokens,
                               temperature=1.0, top_p=1.0, batch_size=batch_size, seed=seed, progress=progress,
                               desc="base samples")
    return [ids for ids, _finished in results]


def _batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[s : s + batch_size] for s in range(0, len(order), batch_size)]


def _padded(sequences: Sequence[Sequence[int]], scored: Sequence[Sequence[int]], device) -> tuple:
    """Right-padded ids, attention mask and the positions whose hidden state predicts a scored token."""
    width = max(len(s) for s in sequences)
    ids = torch.zeros(len(sequences), width, dtype=torch.long)
    attn = torch.zeros(len(sequences), width, dtype=torch.long)
    score = torch.zeros(len(sequences), width, dtype=torch.bool)
    for r, (seq, mask) in enumerate(zip(sequences, scored)):
        ids[r, : len(seq)] = torch.as_tensor(list(seq), dtype=torch.long)
        attn[r, : len(seq)] = 1
        score[r, : len(seq)] = torch.as_tensor(list(mask), dtype=torch.long) != 0
    score[:, 0] = False  # the first token has no context
    predictor = torch.zeros_like(score)
    predictor[:, :-1] = score[:, 1:]  # the hidden state at j - 1 predicts token j
    return ids.to(device), attn.to(device), predictor.to(device)


def _log_softmax_rows(model, hidden: torch.Tensor) -> torch.Tensor:
    """float32 log-probabilities of the next token for rows of final hidden states (LM head, scale, soft-cap)."""
    head = model.get_output_embeddings()
    z = head(hidden.to(head.weight.dtype)).float()
    transform = lm_head_transform(model)
    if transform["logit_scale"] != 1.0:
        z = z * transform["logit_scale"]
    if transform["softcap"] is not None:
        z = torch.tanh(z / transform["softcap"]) * transform["softcap"]
    return z.log_softmax(-1)


def _response_batches(tokenizer, prompts, responses, batch_size):
    """Prompt+response sequences, their response masks, and batches of indices (longest first)."""
    encoded = _encode_prompts(tokenizer, prompts)
    if any(not p for p in encoded):
        raise ValueError("An empty prompt has no context for its first response token; give non-empty prompts.")
    sequences = [p + list(r) for p, r in zip(encoded, responses)]
    masks = [[0] * len(p) + [1] * len(r) for p, r in zip(encoded, responses)]
    return sequences, masks, _batches([len(s) for s in sequences], batch_size)


def _hidden_at_responses(model, sequences, masks) -> tuple[torch.Tensor, torch.Tensor]:
    """Final hidden states at the positions that predict response tokens ([n_tokens, H], rows in (sequence,
    position) order) and the sequence index of each row."""
    ids, attn, pred = _padded(sequences, masks, next(model.parameters()).device)
    h = backbone(model)(input_ids=ids, attention_mask=attn, use_cache=False).last_hidden_state
    return h[pred], pred.nonzero()[:, 0].cpu()


@torch.no_grad()
def base_hidden_states(base_model, tokenizer, prompts: Sequence, responses: Sequence[Sequence[int]],
                       batch_size: int = 8, *, progress: bool = True) -> list[torch.Tensor]:
    """The base model's final hidden states at the response positions, one ``[len(response), H]`` tensor per prompt
    (on the CPU). A study computes them once and passes them to every `kl_to_base` call as ``base_hidden``: the KL
    then needs one transformer forward (the trained model's) instead of two. Small: H floats per response token."""
    from tqdm.auto import tqdm

    sequences, masks, batches = _response_batches(tokenizer, prompts, responses, batch_size)
    out: list[torch.Tensor | None] = [None] * len(sequences)
    was_training = base_model.training
    base_model.eval()
    try:
        for batch in tqdm(batches, desc="base hidden states", unit="batch", disable=not progress, dynamic_ncols=True):
            h, row_of = _hidden_at_responses(base_model, [sequences[i] for i in batch], [masks[i] for i in batch])
            h = h.float().cpu()
            for r, i in enumerate(batch):
                out[i] = h[row_of == r].clone()
    finally:
        base_model.train(was_training)
    return out  # type: ignore[return-value]


@torch.no_grad()
def kl_to_base(
    base_model,
    model,
    tokenizer,
    prompts: Sequence,
    responses: Sequence[Sequence[int]],
    batch_size: int = 8,
    *,
    base_hidden: Sequence[torch.Tensor] | None = None,
    token_chunk: int = 256,
    progress: bool = True,
) -> dict:
    """Forward KL(base || model) per response token, exact over the vocabulary at each position (module docstring).

    ``responses`` are token ids sampled from ``base_model`` for ``prompts`` (`sample_base_responses`); the prompts are
    rendered and tokenized the same way. ``base_hidden`` (optional): `base_hidden_states` of the same prompts and
    responses, which saves the base model's transformer forward (its LM head is still applied). Returns ``kl`` (mean
    over all response tokens), ``kl_prompt_mean`` (mean of per-prompt means), ``ci_low``/``ci_high`` (95% interval of
    the per-prompt means), ``per_prompt`` (None for an empty response), ``num_prompts`` and ``num_tokens``. Both models
    must share the tokenizer and vocabulary.
    """
    from tqdm.auto import tqdm

    if len(prompts) != len(responses):
        raise ValueError(f"kl_to_base: {len(prompts)} prompts but {len(responses)} responses; give one response per prompt.")
    if batch_size < 1 or token_chunk < 1:
        raise ValueError(f"batch_size={batch_size} and token_chunk={token_chunk} must both be >= 1.")
    v_base = base_model.get_output_embeddings().weight.shape[0]
    v_model = model.get_output_embeddings().weight.shape[0]
    if v_base != v_model:
        raise ValueError(f"kl_to_base: the base model has {v_base} output tokens and the trained model {v_model}; "
                         "the KL needs models with the same vocabulary.")
    if base_hidden is not None and (len(base_hidden) != len(responses)
                                    or any(h.shape[0] != len(r) for h, r in zip(base_hidden, responses))):
        raise ValueError("kl_to_base: base_hidden does not match the responses (one [len(response), H] tensor per "
                         "prompt); compute it with base_hidden_states on the same prompts and responses.")
    sequences, masks, batches = _response_batches(tokenizer, prompts, responses, batch_size)
    sums, counts = [0.0] * len(prompts), [len(r) for r in responses]
    base_device = next(base_model.parameters()).device
    states = (base_model.training, model.training)
    base_model.eval()
    model.eval()
    try:
        for batch in tqdm(batches, desc="KL to base", unit="batch", disable=not progress, dynamic_ncols=True):
            if not any(counts[i] for i in batch):
                continue
            seqs, msks = [sequences[i] for i in batch], [masks[i] for i in batch]
            h_model, row_of = _hidden_at_responses(model, seqs, msks)
            if base_hidden is None:
                h_base, _ = _hidden_at_responses(base_model, seqs, msks)
            else:
                h_base = torch.cat([base_hidden[i] for i in batch]).to(base_device)
            kl = torch.empty(h_model.shape[0], dtype=torch.float64)
            for t0 in range(0, kl.shape[0], token_chunk):
                lp_base = _log_softmax_rows(base_model, h_base[t0 : t0 + token_chunk])
                lp_model = _log_softmax_rows(model, h_model[t0 : t0 + token_chunk]).to(lp_base.device)
                kl[t0 : t0 + token_chunk] = (lp_base.exp() * (lp_base - lp_model)).sum(-1).double().cpu()
            per_row = torch.zeros(len(batch), dtype=torch.float64).index_add_(0, row_of, kl)
            for r, i in enumerate(batch):
                sums[i] += float(per_row[r])
    finally:
        base_model.train(states[0])
        model.train(states[1])
    return _summary(sums, counts, "kl")


@torch.no_grad()
def heldout_nll(model, tokenizer, rows: Sequence[dict], batch_size: int = 8, *, progress: bool = True) -> dict:
    """Per-token NLL of reference completions given their prompts (completion tokens only).

    ``rows`` are prompt-completion rows (``prompt`` and ``completion`` as chat messages or as strings), tokenized as
    TRL's SFTTrainer tokenizes them (chat template with the generation prompt for the prompt; the completion is what
    the full conversation adds; plain-text completions get the EOS appended). Scored with
    `trl_onpolicy.ddt.scoring.score_token_ids` (LM head in vocabulary tiles). Returns ``nll`` (mean over all completion
    tokens, the quantity SFTTrainer's loss averages), ``nll_prompt_mean``, ``ci_low``/``ci_high`` (95% interval of the
    per-prompt means), ``per_prompt``, ``num_prompts`` and ``num_tokens``.
    """
    from trl_onpolicy.ddt.scoring import Encoder, SkipSample, score_token_ids

    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1.")
    encoder = Encoder(tokenizer, "prompt_completion")
    sequences, masks = [], []
    for k, row in enumerate(rows):
        if "prompt" not in row or "completion" not in row:
            raise ValueError(f"heldout_nll: row {k} needs `prompt` and `completion` columns; it has {sorted(row)}.")
        try:
            ids, mask = encoder(row)
        except SkipSample as err:
            raise ValueError(f"heldout_nll: row {k} cannot be scored ({err}); give it a non-empty completion.") from err
        sequences.append(ids)
        masks.append(mask)
    scored = score_token_ids(model, sequences, masks, batch_size=batch_size, progress=progress, desc="held-out NLL")
    sums = [-float(s["log_probs"].astype("float64").sum()) for s in scored]
    counts = [int(s["log_probs"].size) for s in scored]
    return _summary(sums, counts, "nll")
