"""Hinted Decoding: sample from a geometric mixture of two streams of one model (method.md section 3).

For every sample there are two prompts: the *hinted* prompt (question + reference solution, distribution ``p``)
and the *plain* prompt (the ordinary training prompt, distribution ``q``). Both streams advance in lock-step and
every chosen token is appended to both. At each step

    Hn     = H(p) / ln V                      (V = size of the model's output distribution, logits.shape[-1])
    lambda = f(Hn)                            (see `mixing_lambda`)
    log m  = (1 - lambda) log p + lambda log q, renormalised

and the next token is drawn from ``m``. The first token comes from the hinted stream alone (lambda = 0); once the
``splitter`` string appears in the decoded output only the plain stream decodes (lambda = 1).

Unlike the authors' loop (one sample, full-prefix recompute per token), `hinted_decode` batches samples, keeps a
KV cache, left-pads prompts with a proper attention mask and position ids, and advances the hinted and plain rows
of all samples in one forward pass per step (a batch of ``2 * B`` rows). Finished rows (and hinted rows after the
splitter) are dropped from the cache as they finish.

The loop's own work per step does not grow with the length of the output: the repetition guard is a rolling hash
with a counter (`RepetitionGuard`), the splitter is looked for in the last few tokens only, and only after tokens
that can end it (`SplitterWatch`), row bookkeeping lives in index tensors, and the KV cache keeps spare room instead
of being concatenated at every step. The tokens are the same as recounting and re-decoding the whole output at
every step (tests/test_hinted.py checks this against a no-cache reference loop).

The math (entropy, lambda maps, mixture, nucleus, sampler, stop rules) lives in `trl_onpolicy.hinted.sampling`, the
forward and KV-cache plumbing in `trl_onpolicy.hinted.cache`; `hinted_decode` is the batching loop around them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from trl_onpolicy.hinted.cache import (
    cache_argument,
    cache_of,
    context_window,
    forward_kwargs,
    left_pad,
    separate_prefill,
    use_buffered_layers,
)
from trl_onpolicy.hinted.sampling import (  # noqa: F401  (re-exported: the public names of hinted.decoding)
    LAMBDA_MODES,
    SAMPLING_ORDERS,
    RepetitionGuard,
    SplitterWatch,
    hinted_entropy,
    inverse_cdf_sample,
    mix_log_probs,
    mixing_lambda,
    repetition_counts,
    select_tokens,
    top_p_filter,
)

__all__ = [
    "HintedResult",
    "hinted_decode",
    "hinted_entropy",
    "mixing_lambda",
    "mix_log_probs",
    "repetition_counts",
    "RepetitionGuard",
    "SplitterWatch",
    "select_tokens",
    "inverse_cdf_sample",
    "top_p_filter",
    "resolve_eos_token_ids",
]


@dataclass
class HintedResult:
    """One sample's output of `hinted_decode`.

    - ``token_ids``: generated ids, including the EOS id that ended the sample (if any);
    - ``finish_reason``: ``"eos"``, ``"length"`` (max_new_tokens reached) or ``"repetition"`` (repetition guard);
    - ``lambda_mean``: mean mixing weight over the generated tokens (0 = hinted stream, 1 = plain stream),
      counting the first token (0) and tokens after the splitter (1);
    - ``lambdas``: the per-token weights (only with ``return_lambdas=True``);
    - ``entropy_mean``: mean normalised entropy ``H(p)/ln V`` of the hinted stream over the mixed steps
      (None if no step was mixed);
    - ``splitter_pos``: number of tokens generated when the splitter first appeared in the decoded text (tokens
      from this index on were decoded by the plain stream alone), or None.
    """

    token_ids: list[int]
    finish_reason: str
    lambda_mean: float
    lambdas: list[float] | None = None
    entropy_mean: float | None = None
    splitter_pos: int | None = None
    extras: dict = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


# ----------------------------------------------------------------------------------------------------------------
# input handling
# ----------------------------------------------------------------------------------------------------------------


def _as_id_lists(ids, name: str) -> list[list[int]]:
    if isinstance(ids, torch.Tensor):
        raise ValueError(
            f"{name} must be a list with one prompt per sample (lists of ints or 1-D tensors), not a single tensor; "
            f"a padded 2-D tensor would make padding part of the prompt. Use [row[mask.bool()].tolist() ...]."
        )
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
        raise ValueError(f"{name} must be a list of token-id lists (one per sample), got {type(ids).__name__}.")
    out = []
    for i, row in enumerate(ids):
        if isinstance(row, torch.Tensor):
            if row.dim() != 1:
                raise ValueError(f"{name}[{i}] must be a 1-D tensor of token ids, got shape {tuple(row.shape)}.")
            row = row.tolist()
        elif isinstance(row, (str, bytes)) or not isinstance(row, Sequence):
            raise ValueError(f"{name}[{i}] must be a list of token ids (did you pass text? tokenize it first).")
        row = [int(t) for t in row]
        if not row:
            raise ValueError(f"{name}[{i}] is empty: every prompt needs at least one token.")
        out.append(row)
    return out


def _output_vocab_size(model) -> int | None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if weight is not None and weight.dim() == 2 and weight.shape[0] > 0:
        return int(weight.shape[0])
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    size = getattr(config, "vocab_size", None)
    return int(size) if size else None


def resolve_eos_token_ids(model, tokenizer, eos_token_ids=None) -> list[int]:
    """The ids that end a sample: ``eos_token_ids`` if given, else `trl_onpolicy.utils.generation.eos_token_ids` (the
    model's generation-config EOS ids together with the tokenizer's)."""
    if eos_token_ids is not None:
        ids = [eos_token_ids] if isinstance(eos_token_ids, int) else list(eos_token_ids)
        return sorted({int(i) for i in ids})
    from trl_onpolicy.utils.generation import eos_token_ids as default_eos_ids

    return default_eos_ids(model, tokenizer)


def _validate(beta, lambda_mode, lambda_center, lambda_h1, lambda_h2, max_new_tokens, temperature, top_p,
              repetition_window, repetition_count, batch_size, sampling_order):
    from trl_onpolicy.utils.validation import COUNT, NON_NEGATIVE, OPTIONAL_COUNT, PROBABILITY_OPEN_LOW, Range, check_choice, check_value

    check_choice("lambda_mode", lambda_mode, LAMBDA_MODES, "hinted_decode")
    checks = {"beta": (beta, NON_NEGATIVE), "max_new_tokens": (max_new_tokens, COUNT),
              "temperature": (temperature, NON_NEGATIVE), "top_p": (top_p, PROBABILITY_OPEN_LOW),
              "batch_size": (batch_size, OPTIONAL_COUNT)}
    if lambda_mode == "sigmoid":
        checks["lambda_center"] = (lambda_center, Range())
    if lambda_mode == "piecewise":
        checks.update(lambda_h1=(lambda_h1, Range()), lambda_h2=(lambda_h2, Range()))
    if repetition_window is not None and repetition_count is not None:
        checks.update(repetition_window=(repetition_window, COUNT), repetition_count=(repetition_count, Range(lo=2, integer=True)))
    for name, (value, rule) in checks.items():
        check_value(name, value, rule, "hinted_decode")
    if lambda_mode == "piecewise" and not lambda_h1 < lambda_h2:
        raise ValueError(
            f"piecewise mode needs finite lambda_h1 < lambda_h2 (thresholds on H/ln V), got {lambda_h1!r}, {lambda_h2!r}."
        )
    if sampling_order not in SAMPLING_ORDERS:
        raise ValueError(f"sampling_order must be one of {SAMPLING_ORDERS}, got {sampling_order!r}.")


# ----------------------------------------------------------------------------------------------------------------
# the decoder
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def hinted_decode(
    model,
    tokenizer,
    hinted_input_ids,
    plain_input_ids,
    *,
    beta: float = 3.0,
    lambda_mode: str = "linear",
    lambda_center: float = 0.5,
    lambda_h1: float = 0.1,
    lambda_h2: float = 0.4,
    splitter: str | None = None,
    max_new_tokens: int = 512,
    temperature: float = 0.3,
    top_p: float = 0.95,
    eos_token_ids: int | Sequence[int] | None = None,
    repetition_window: int | None = 30,
    repetition_count: int | None = 5,
    seed: int | Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    batch_size: int | None = None,
    return_lambdas: bool = False,
    sampling_order: str = "top_p_first",
    pad_token_id: int | None = None,
    prefill: str = "auto",
    progress: bool = False,
) -> list[HintedResult]:
    """Hinted Decoding of a batch of samples; returns one `HintedResult` per sample, in input order.

    Args:
        model: any Hugging Face causal LM (``model(input_ids, attention_mask, position_ids, past_key_values)``).
            It is put in eval mode for the call and restored afterwards.
        tokenizer: used to decode the output for the ``splitter`` check and for default EOS/pad ids; its ids must
            fit the model's output vocabulary (a larger model vocabulary, as in Qwen, is fine). May be None when
            no splitter is used and ``eos_token_ids`` is given.
        hinted_input_ids / plain_input_ids: one prompt per sample (lists of ints or 1-D tensors, unpadded).
        beta, lambda_mode, lambda_center, lambda_h1, lambda_h2: the mixing rule, see `mixing_lambda`.
        splitter: once this string appears in the decoded output, only the plain stream decodes.
        max_new_tokens: at most this many tokens per sample (finish reason ``"length"``). The longest prompt plus
            this must fit the model's context window (``config.max_position_embeddings``), checked before decoding.
        temperature, top_p, sampling_order: 0 = greedy; else top-p filtering of the mixture then temperature
            (``sampling_order="top_p_first"``, method.md's order) or HF's order (``"temperature_first"``).
        eos_token_ids: ids that end a sample (default: `resolve_eos_token_ids`). Finish reason ``"eos"``.
        repetition_window, repetition_count: stop with ``"repetition"`` once the last ``repetition_window``
            tokens occur ``repetition_count`` times in the output (see `repetition_counts`); None (either) disables.
        seed: an int (sample ``i`` then draws from its own generator seeded ``seed + i``) or one seed per sample;
            either way a sample's draws do not depend on the rest of the batch or on ``batch_size``.
        generator: a single ``torch.Generator`` shared by all rows instead (results then depend on batch order).
        batch_size: samples per chunk (each chunk runs ``2 * batch_size`` rows); None = all at once. With
            chunking, samples are grouped by prompt length to reduce padding.
        return_lambdas: keep the per-token lambdas in ``result.lambdas``.
        pad_token_id: id written at padded positions (masked; default: the tokenizer's pad, else an EOS id).
        prefill: ``"joint"`` prefills hinted and plain rows in one forward padded to the longest prompt;
            ``"separate"`` prefills them in two forwards and stacks the caches (less padding computed; needs a plain
            `DynamicCache`); ``"auto"`` = separate when possible, else joint. Decoding is one forward per step
            either way.
        progress: show a tqdm bar over samples.
    """
    if prefill not in ("auto", "separate", "joint"):
        raise ValueError(f"prefill must be 'auto', 'separate' or 'joint', got {prefill!r}.")
    _validate(beta, lambda_mode, lambda_center, lambda_h1, lambda_h2, max_new_tokens, temperature, top_p,
              repetition_window, repetition_count, batch_size, sampling_order)
    if seed is not None and generator is not None:
        raise ValueError("Pass either seed or generator, not both.")
    if repetition_window is None or repetition_count is None:  # either one None disables the guard
        repetition_window = repetition_count = None
    hinted = _as_id_lists(hinted_input_ids, "hinted_input_ids")
    plain = _as_id_lists(plain_input_ids, "plain_input_ids")
    if len(hinted) != len(plain):
        raise ValueError(f"hinted_input_ids has {len(hinted)} prompts but plain_input_ids has {len(plain)}: one of each per sample.")
    n = len(hinted)
    if n == 0:
        return []
    if splitter is not None and (not isinstance(splitter, str) or not splitter):
        raise ValueError(f"splitter must be a non-empty string or None, got {splitter!r}.")
    if splitter is not None and tokenizer is None:
        raise ValueError("A tokenizer is needed to detect the splitter in the decoded output.")

    vocab = _output_vocab_size(model)
    if vocab is not None and tokenizer is not None and len(tokenizer) > vocab:
        raise ValueError(
            f"The tokenizer has {len(tokenizer)} tokens but the model's output layer has only {vocab}: its ids do not "
            f"fit the model's vocabulary. Use the tokenizer that belongs to this model (or resize the embeddings)."
        )
    if vocab is not None:
        for name, rows in (("hinted_input_ids", hinted), ("plain_input_ids", plain)):
            for i, row in enumerate(rows):
                lo, hi = min(row), max(row)
                if lo < 0 or hi >= vocab:
                    raise ValueError(f"{name}[{i}] holds token id {hi if hi >= vocab else lo}, outside the model's vocabulary [0, {vocab}).")

    window = context_window(model)
    if window is not None:
        for name, rows in (("hinted_input_ids", hinted), ("plain_input_ids", plain)):
            i = max(range(n), key=lambda k: len(rows[k]))
            if len(rows[i]) + max_new_tokens > window:
                raise ValueError(
                    f"{name}[{i}] has {len(rows[i])} tokens: with max_new_tokens={max_new_tokens} it needs "
                    f"{len(rows[i]) + max_new_tokens} positions, beyond the model's context window of {window} "
                    "(config.max_position_embeddings); shorten the prompt (reference, hint template) or lower "
                    "max_new_tokens.")

    eos_ids = resolve_eos_token_ids(model, tokenizer, eos_token_ids)
    if pad_token_id is None:
        pad_token_id = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
        if pad_token_id is None:
            pad_token_id = eos_ids[0] if eos_ids else 0

    if seed is not None:
        seeds = [int(seed) + i for i in range(n)] if isinstance(seed, int) else [int(s) for s in seed]
        if len(seeds) != n:
            raise ValueError(f"seed has {len(seeds)} entries for {n} samples: pass an int or one seed per sample.")
    else:
        seeds = None

    device = next(model.parameters()).device
    order = list(range(n))
    if batch_size is not None and batch_size < n:
        order.sort(key=lambda i: (len(hinted[i]), len(plain[i])))
    chunk = batch_size or n
    chunks = [order[k : k + chunk] for k in range(0, n, chunk)]

    settings = dict(
        beta=beta, lambda_mode=lambda_mode, lambda_center=lambda_center, lambda_h1=lambda_h1, lambda_h2=lambda_h2,
        splitter=splitter, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, eos_ids=eos_ids,
        repetition_window=repetition_window, repetition_count=repetition_count, return_lambdas=return_lambdas,
        sampling_order=sampling_order, pad_token_id=pad_token_id, forward_kwargs=forward_kwargs(model),
        prefill=prefill,
    )
    results: list[HintedResult | None] = [None] * n
    was_training = model.training
    model.eval()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc="hinted decoding", unit="sample")
    try:
        for idx in chunks:
            gens = None
            if seeds is not None:
                gens = [torch.Generator().manual_seed(seeds[i]) for i in idx]  # CPU: same draws on any device
            elif generator is not None:
                gens = generator
            chunk_results = _decode_chunk(model, tokenizer, [hinted[i] for i in idx], [plain[i] for i in idx],
                                          device=device, generators=gens, **settings)
            for i, r in zip(idx, chunk_results):
                results[i] = r
            if bar is not None:
                bar.update(len(idx))
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    return results  # type: ignore[return-value]


def _decode_chunk(model, tokenizer, hinted, plain, *, device, generators, beta, lambda_mode, lambda_center, lambda_h1,
                  lambda_h2, splitter, max_new_tokens, temperature, top_p, eos_ids, repetition_window,
                  repetition_count, return_lambdas, sampling_order, pad_token_id, forward_kwargs, prefill):
    """Decode one chunk of samples. The host work per step does not grow with the length: row bookkeeping is held
    in index tensors that change only when a sample finishes or splits, the repetition guard and the splitter check
    are incremental (`RepetitionGuard`, `SplitterWatch`), per-token records go into preallocated buffers, and the
    attention mask is a view of a preallocated buffer instead of a concatenation per step."""
    b = len(hinted)
    prompts = hinted + plain  # rows 0..b-1 hinted, b..2b-1 plain
    out = None
    if prefill in ("auto", "separate"):
        out, attention = separate_prefill(model, hinted, plain, pad_token_id, device, forward_kwargs)
        if out is None and prefill == "separate":
            raise ValueError("prefill='separate' needs a model whose cache is a plain DynamicCache; use 'joint'.")
    if out is None:
        input_ids, attention = left_pad(prompts, pad_token_id, device)
        position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=input_ids, attention_mask=attention, position_ids=position_ids, use_cache=True,
                    **forward_kwargs)
    cache = cache_of(out)
    use_buffered_layers(cache, min(max_new_tokens, 256))
    cache_arg = cache_argument(model)
    can_prune = hasattr(cache, "batch_select_indices")
    next_pos = torch.tensor([len(p) for p in prompts], device=device)
    prompt_width = attention.shape[1]
    # the attention mask of step t is attn[:, : prompt_width + t + 1]; columns past the prompt are all ones
    attn = torch.cat([attention, attention.new_ones((attention.shape[0], max_new_tokens))], dim=1)

    # the rows in the batch (CPU): which sample each row belongs to and whether it is the hinted one
    row_sample = torch.arange(2 * b).remainder(b)
    row_hinted = torch.arange(2 * b) < b
    # for every sample, the row of its plain stream and the row its hinted logits are read from (the plain row
    # once the hinted row has been dropped after the splitter)
    plain_row = torch.arange(b) + b
    hinted_row = torch.arange(b)

    tokens = torch.full((b, max_new_tokens), -1, dtype=torch.long)  # generated ids, on CPU
    lam_buf = torch.zeros((b, max_new_tokens), dtype=torch.float32, device=device)
    ent_buf = torch.zeros((b, max_new_tokens), dtype=torch.float32, device=device)
    mixed_buf = torch.zeros((b, max_new_tokens), dtype=torch.bool)  # steps whose lambda came from the entropy
    eos = torch.tensor(eos_ids, dtype=torch.long)
    active = torch.arange(b)  # samples still decoding, ascending
    active_list = active.tolist()
    active_dev = active.to(device)
    split = torch.zeros(b, dtype=torch.bool)
    split_at: list[int | None] = [None] * b
    finish: list[str | None] = [None] * b
    finished = torch.zeros(b, dtype=torch.bool)
    guard = RepetitionGuard(b, repetition_window, repetition_count) if repetition_window is not None else None
    watch = SplitterWatch(tokenizer, splitter) if splitter is not None else None
    uniforms = None
    if isinstance(generators, list) and temperature > 0:
        # each sample's draws for the whole response, from its own generator (same numbers as one draw per step)
        uniforms = torch.stack([torch.rand(max_new_tokens, generator=g, dtype=torch.float64,
                                           device=g.device if g is not None else "cpu").cpu() for g in generators])
    rows_dev = torch.cat([hinted_row, plain_row]).to(device)

    for step in range(max_new_tokens):
        n_act = len(active_list)
        logits = out.logits[:, -1, :].index_select(0, rows_dev).float()
        log_p, log_q = logits[:n_act].log_softmax(-1), logits[n_act:].log_softmax(-1)
        hn = hinted_entropy(log_p)
        lam = mixing_lambda(hn, lambda_mode, beta=beta, center=lambda_center, h1=lambda_h1, h2=lambda_h2)
        if step == 0:
            lam = torch.zeros_like(lam)  # the first token comes from the hinted stream alone
            mixed = torch.zeros(n_act, dtype=torch.bool)
        else:
            is_split = split[active]
            mixed = ~is_split
            if watch is not None:
                lam = torch.where(is_split.to(device), torch.ones_like(lam), lam)
        log_m = mix_log_probs(log_p, log_q, lam)
        chosen = select_tokens(log_m, temperature=temperature, top_p=top_p, order=sampling_order,
                               generators=None if uniforms is not None else generators,
                               uniforms=uniforms[active, step] if uniforms is not None else None).cpu()

        tokens[active, step] = chosen
        lam_buf[active_dev, step] = lam
        ent_buf[active_dev, step] = hn
        mixed_buf[active, step] = mixed

        done = torch.isin(chosen, eos)
        repeated = guard.update(tokens, active, active_list, step) if guard is not None else None
        if repeated is not None:
            done = done | repeated
        if step + 1 == max_new_tokens:
            done = torch.ones_like(done)
        any_done = bool(done.any())
        if any_done:
            is_eos = torch.isin(chosen, eos)
            for j in done.nonzero().flatten().tolist():
                s = active_list[j]
                finish[s] = "eos" if is_eos[j] else ("repetition" if repeated is not None and repeated[j] else "length")
        new_split = False
        if watch is not None:
            look = ~done & ~split[active]
            if bool(look.any()):
                look &= watch.may_end(chosen)
            if bool(look.any()):
                candidates = active[look]
                for s, hit in zip(candidates.tolist(), watch.hits(tokens, candidates, step)):
                    if hit:
                        split[s], split_at[s], new_split = True, step + 1, True
        if any_done:
            finished[active[done]] = True
            active = active[~done]
            active_list = active.tolist()
            if not active_list:
                break
            active_dev = active.to(device)

        if can_prune and (any_done or new_split):
            # keep the plain rows of live samples and the hinted rows of live samples that have not split
            keep = ~finished[row_sample] & ~(row_hinted & split[row_sample])
            if not bool(keep.all()):
                keep_idx = keep.nonzero().flatten()
                keep_dev = keep_idx.to(device)
                cache.batch_select_indices(keep_dev)
                attn = attn.index_select(0, keep_dev)
                next_pos = next_pos.index_select(0, keep_dev)
                row_sample, row_hinted = row_sample[keep_idx], row_hinted[keep_idx]
                positions = torch.arange(len(row_sample))
                plain_row[row_sample[~row_hinted]] = positions[~row_hinted]
                hinted_row.copy_(plain_row)
                hinted_row[row_sample[row_hinted]] = positions[row_hinted]
        if any_done or new_split:
            rows_dev = torch.cat([hinted_row[active], plain_row[active]]).to(device)

        step_ids = tokens[row_sample, step]
        if not can_prune:
            step_ids = step_ids.masked_fill(finished[row_sample], pad_token_id)
        out = model(input_ids=step_ids.unsqueeze(-1).to(device), attention_mask=attn[:, : prompt_width + step + 1],
                    position_ids=next_pos.unsqueeze(-1), use_cache=True, **{cache_arg: cache}, **forward_kwargs)
        cache = cache_of(out)
        next_pos = next_pos + 1

    lam_rows, ent_rows = lam_buf.cpu().tolist(), ent_buf.cpu().tolist()
    lengths = (tokens >= 0).sum(-1).tolist()
    results = []
    for s in range(b):
        n = lengths[s]
        lams = lam_rows[s][:n]
        ents = [e for e, m in zip(ent_rows[s][:n], mixed_buf[s, :n].tolist()) if m]
        results.append(HintedResult(
            token_ids=tokens[s, :n].tolist(),
            finish_reason=finish[s] or "length",
            lambda_mean=float(sum(lams) / len(lams)) if lams else 0.0,
            lambdas=list(lams) if return_lambdas else None,
            entropy_mean=float(sum(ents) / len(ents)) if ents else None,
            splitter_pos=split_at[s],
        ))
    return results
