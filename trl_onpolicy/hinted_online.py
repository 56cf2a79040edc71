"""Online Hinted Decoding: re-align every training batch with the CURRENT weights, just before training on it.

Offline re-alignment (`trl-onpolicy realign`) makes a corpus on-policy for the model as it was *before* training;
as the weights move, the corpus drifts off-policy again. Online mode regenerates each batch's responses with the
weights of the very optimizer step that trains on them (zero staleness):

- `HintedDataCollator` collates the ordinary tokenized batch (the reference responses, so evaluation and fallbacks
  work as usual) and keeps, beside it, each sample's plain prompt ids, question, reference and answer.
- `OnlineHintedMixin` overrides `Trainer.get_batch_samples`, which the training loop calls once per optimizer step
  to fetch the whole gradient-accumulation window. There, under `trl.models.unwrap_model_for_generation` (which
  gathers ZeRO-3 shards and pauses gradient checkpointing), it runs `hinted_decode` for every sample of the window,
  rebuilds the micro-batches from ``plain prompt + generated response`` and recounts ``num_items_in_batch``. The
  weights that generate are therefore exactly those the following forward/backward passes use.

  A collator that generates by itself would be one optimizer step stale: accelerate's dataloader reads one batch
  ahead, so the collator runs before the previous step's update.

- `OnlineIDFTTrainer` and `OnlineSFTTrainer` are `IDFTTrainer`/`SFTTrainer` with the mixin.

A generated response is *accepted* by the offline filters' rule (`trl_onpolicy.realign.accept_response`): it ended
with EOS and (unless the checker is "none") its final answer is correct against the answer column, or, without one,
against the reference solution's final answer; a rejected one is replaced by the reference response
(``on_reject="reference"``, default) or trained on anyway (``on_reject="keep"``). Logged each step: ``hinted/acceptance_rate``,
``hinted/mean_phi`` (DDT mean phi of the generated responses under the plain prompt, current weights),
``hinted/mean_lambda`` and ``hinted/response_tokens``.

Requirements: the training dataset is prompt-completion (conversational or not) with a question column and a
reference column (a `trl_onpolicy.data.math_word_problems` dataset has `prompt`, `completion`, `question`,
`solution`, `answer`; an eval dataset needs the same columns, its batches keep the references); ``padding_free=False``
and ``packing=False`` (SFTTrainer refuses custom collators with them).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from trl import SFTTrainer
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from .generation import eos_token_ids
from .idft_trainer import IDFTTrainer
from .realign import (
    DEFAULT_HINT_TEMPLATE,
    accept_response,
    build_hinted_prompt_ids,
    completion_text,
    plain_prompt,
    prompt_ids,
    resolve_checker,
    response_statistics,
)

HINTED_KEY = "hinted"


@dataclass
class HintedBatch:
    """Raw fields of a collated batch that online re-alignment needs (left alone by accelerate's device moves)."""

    plain_prompt_ids: list[list[int]]
    questions: list[str]
    references: list[str]
    answers: list[str | None]
    reference_input_ids: list[list[int]]
    reference_labels: list[list[int]]
    extras: dict = field(default_factory=dict)

    def __len__(self):
        return len(self.questions)


@dataclass
class OnlineHintedArguments:
    """Online Hinted Decoding settings for recipes: parse it beside `IDFTConfig` with `TrlParser` and pass
    ``hinted_collator_kwargs=args.collator_kwargs()`` to `OnlineIDFTTrainer`/`OnlineSFTTrainer`. Each field is the
    `HintedDataCollator` argument of the same name without the ``hinted_`` prefix."""

    hinted_question_column: str = field(default="question", metadata={"help": "Column with the problem."})
    hinted_reference_column: str = field(default="solution", metadata={"help": "Column with the reference solution."})
    hinted_answer_column: str | None = field(default="answer", metadata={"help": "Column with the final answer."})
    hinted_beta: float = field(default=3.0, metadata={"help": "Hinted Decoding beta."})
    hinted_lambda_mode: str = field(default="linear", metadata={"help": "linear, sigmoid or piecewise."})
    hinted_splitter: str | None = field(default="\\boxed{", metadata={"help": "After this, plain stream only."})
    hinted_max_new_tokens: int = field(default=256, metadata={"help": "Maximum generated tokens per response."})
    hinted_temperature: float = field(default=0.3, metadata={"help": "Sampling temperature (0: greedy)."})
    hinted_top_p: float = field(default=0.95, metadata={"help": "Top-p of the sampler."})
    hinted_checker: str = field(default="math_verify", metadata={"help": "Answer checker, or 'none'."})
    hinted_on_reject: str = field(default="reference", metadata={"help": "'reference' or 'keep'."})
    hinted_generation_batch_size: int | None = field(default=None, metadata={"help": "Samples decoded together."})

    def collator_kwargs(self) -> dict:
        return {name[len("hinted_"):]: value for name, value in vars(self).items()}


class HintedDataCollator:
    """Collator for online Hinted Decoding; used by `OnlineHintedMixin` (e.g. `OnlineIDFTTrainer`).

    On its own it returns TRL's ordinary padded batch of the reference responses plus a `HintedBatch` under the
    ``"hinted"`` key. The trainer mixin then replaces the responses with ones generated by the current weights
    (`realign`), so that training on them is on-policy. The decoding settings live here.

    Args:
        tokenizer: the model's tokenizer (with a chat template for conversational prompts).
        question_column, reference_column, answer_column, prompt_column: dataset columns. The plain prompt is the
            `prompt_column` (the ordinary training prompt) or, if absent, the chat template on the question.
        hint_template, system_prompt, analysis_max_new_tokens: the hinted prompt (see `trl_onpolicy.realign`).
        beta, lambda_mode, lambda_center, lambda_h1, lambda_h2, splitter, max_new_tokens, temperature, top_p:
            passed to `trl_onpolicy.hinted.hinted_decode`.
        checker: answer checker spec (`trl_onpolicy.realign.resolve_checker`), or "none".
        on_reject: "reference" (train on the reference instead of a rejected response) or "keep".
        generation_batch_size: samples decoded together (default: the whole accumulation window at once).
        compute_phi: score the generated responses with DDT (one extra forward without gradients) for logging.
        max_length, completion_only_loss, pad_token_id: set from the trainer's config by the mixin when left None.
    """

    def __init__(
        self,
        tokenizer,
        *,
        question_column: str = "question",
        reference_column: str = "solution",
        answer_column: str | None = "answer",
        prompt_column: str | None = "prompt",
        hint_template: str = DEFAULT_HINT_TEMPLATE,
        system_prompt: str | None = None,
        analysis_max_new_tokens: int = 0,
        beta: float = 3.0,
        lambda_mode: str = "linear",
        lambda_center: float = 0.5,
        lambda_h1: float = 0.1,
        lambda_h2: float = 0.4,
        splitter: str | None = "\\boxed{",
        max_new_tokens: int = 256,
        temperature: float = 0.3,
        top_p: float = 0.95,
        checker: str | Callable | None = "math_verify",
        on_reject: str = "reference",
        generation_batch_size: int | None = None,
        compute_phi: bool = True,
        max_length: int | None = None,
        completion_only_loss: bool | None = None,
        pad_token_id: int | None = None,
    ):
        if on_reject not in ("reference", "keep"):
            raise ValueError(f"on_reject must be 'reference' or 'keep', got {on_reject!r}.")
        for key in ("{question}", "{reference}"):
            if key not in hint_template:
                raise ValueError(f"hint_template must contain {key}.")
        self.tokenizer = tokenizer
        self.question_column, self.reference_column = question_column, reference_column
        self.answer_column, self.prompt_column = answer_column, prompt_column
        self.hint_template, self.system_prompt = hint_template, system_prompt
        self.analysis_max_new_tokens = analysis_max_new_tokens
        self.decode_kwargs = dict(beta=beta, lambda_mode=lambda_mode, lambda_center=lambda_center, lambda_h1=lambda_h1,
                                  lambda_h2=lambda_h2, splitter=splitter, max_new_tokens=max_new_tokens,
                                  temperature=temperature, top_p=top_p)
        self.checker = resolve_checker(checker)
        self.on_reject = on_reject
        self.generation_batch_size = generation_batch_size
        self.compute_phi = compute_phi
        self.max_length = max_length
        self.completion_only_loss = completion_only_loss
        if pad_token_id is None:
            pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_token_id = pad_token_id

    # -- collation ----------------------------------------------------------------------------------------------------

    def _pad(self, input_ids, labels) -> dict:
        return DataCollatorForLanguageModeling(pad_token_id=self.pad_token_id)(
            [{"input_ids": i, "labels": lab} for i, lab in zip(input_ids, labels)]
        )

    def __call__(self, examples: list[dict]) -> dict:
        missing = [c for c in ("input_ids", self.question_column, self.reference_column) if c not in examples[0]]
        if missing:
            raise ValueError(
                f"HintedDataCollator: the examples have no {missing} (they have {sorted(examples[0])}). Use a "
                "prompt-completion dataset with question and reference columns (set question_column/reference_column), "
                "tokenized by SFTTrainer; OnlineHintedMixin keeps these columns when remove_unused_columns=True."
            )
        input_ids = [list(ex["input_ids"]) for ex in examples]
        labels = [list(ex.get("labels", ex["input_ids"])) for ex in examples]
        batch = self._pad(input_ids, labels)
        batch[HINTED_KEY] = HintedBatch(
            plain_prompt_ids=[
                prompt_ids(self.tokenizer, plain_prompt(ex, prompt_column=self.prompt_column,
                                                        question_column=self.question_column,
                                                        system_prompt=self.system_prompt))
                for ex in examples
            ],
            questions=[str(ex[self.question_column]) for ex in examples],
            references=[str(ex[self.reference_column]) for ex in examples],
            answers=[None if not self.answer_column or ex.get(self.answer_column) is None else str(ex[self.answer_column])
                     for ex in examples],
            reference_input_ids=input_ids,
            reference_labels=labels,
        )
        return batch

    # -- re-alignment ---------------------------------------------------------------------------------------------------

    def _sequence(self, prompt: list[int], response: list[int]) -> tuple[list[int], list[int]]:
        ids = prompt + response
        labels = ([-100] * len(prompt) if self.completion_only_loss is not False else list(prompt)) + list(response)
        if self.max_length is not None:
            ids, labels = ids[: self.max_length], labels[: self.max_length]
        return ids, labels

    @torch.no_grad()
    def realign(self, model, batches: list[dict], *, seed: int | None = None) -> tuple[list[dict], dict]:
        """Replace the responses of every batch in ``batches`` (one accumulation window) by hinted-decoding
        responses of ``model`` (already unwrapped for generation). Returns the new batches (tensors on the device of
        the old ones) and statistics: sums and counts for acceptance, phi, lambda and response tokens."""
        from .hinted import hinted_decode

        parts = [b[HINTED_KEY] for b in batches]
        flat = lambda attr: [x for p in parts for x in getattr(p, attr)]  # noqa: E731
        plain, questions, references = flat("plain_prompt_ids"), flat("questions"), flat("references")
        answers, ref_ids, ref_labels = flat("answers"), flat("reference_input_ids"), flat("reference_labels")
        hinted, _ = build_hinted_prompt_ids(
            model, self.tokenizer, questions, references, template=self.hint_template, system_prompt=self.system_prompt,
            analysis_max_new_tokens=self.analysis_max_new_tokens,
        )
        seeds = None if seed is None else [seed + i for i in range(len(plain))]
        results = hinted_decode(model, self.tokenizer, hinted, plain, seed=seeds, batch_size=self.generation_batch_size,
                                **self.decode_kwargs)
        responses = [list(r.token_ids) for r in results]
        eos = eos_token_ids(model, self.tokenizer)
        accepted = [  # the same rule as the offline realign filters
            accept_response(completion_text(self.tokenizer, response, eos), r.finish_reason, answer, reference,
                            self.checker).accepted
            for r, response, answer, reference in zip(results, responses, answers, references)
        ]
        stats = {
            "num_samples": float(len(results)),
            "accepted": float(sum(accepted)),
            "lambda_sum": float(sum(r.lambda_mean for r in results)),
            "response_tokens": float(sum(len(x) for x in responses)),
            "phi_sum": 0.0,
            "phi_tokens": 0.0,
        }
        if self.compute_phi:
            for s in response_statistics(model, plain, responses):
                if s["num_tokens"]:
                    stats["phi_sum"] += s["mean_phi"] * s["num_tokens"]
                    stats["phi_tokens"] += s["num_tokens"]

        new_batches, k = [], 0
        for batch, part in zip(batches, parts):
            ids_list, labels_list = [], []
            for _ in range(len(part)):
                if accepted[k] or self.on_reject == "keep":
                    ids, labels = self._sequence(plain[k], responses[k])
                else:
                    ids, labels = ref_ids[k], ref_labels[k]
                ids_list.append(ids)
                labels_list.append(labels)
                k += 1
            device = batch["input_ids"].device
            new = {key: value.to(device) for key, value in self._pad(ids_list, labels_list).items()}
            new_batches.append(new)
        return new_batches, stats


class OnlineHintedMixin:
    """Trainer mixin for online Hinted Decoding (put it before the trainer class: ``class T(OnlineHintedMixin,
    SFTTrainer)``). Uses ``data_collator`` if it is a `HintedDataCollator`, else builds a default one from
    ``processing_class``; ``hinted_collator_kwargs`` are passed to that default."""

    def __init__(self, *args, data_collator=None, hinted_collator_kwargs: dict | None = None, **kwargs):
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        if training_args is not None:
            if getattr(training_args, "padding_free", False) or getattr(training_args, "packing", False):
                raise ValueError(
                    "Online Hinted Decoding rebuilds each batch with its own collator, which SFTTrainer does not allow "
                    "with padding_free or packing. Set padding_free=False and packing=False."
                )
        if data_collator is not None and not isinstance(data_collator, HintedDataCollator):
            raise TypeError(
                f"{type(self).__name__} needs a HintedDataCollator (or none, for a default one), got "
                f"{type(data_collator).__name__}."
            )
        if data_collator is not None and hinted_collator_kwargs:
            raise ValueError("Pass either data_collator or hinted_collator_kwargs, not both.")
        self._hinted_collator_kwargs = hinted_collator_kwargs or {}
        self._pending_hinted_collator = data_collator
        # SFTTrainer needs a collator at construction only to skip its own; give it ours when we have it
        super().__init__(*args, data_collator=data_collator, **kwargs)
        collator = self._pending_hinted_collator
        if collator is None:
            if self.processing_class is None:
                raise ValueError("Pass processing_class (the tokenizer) or a HintedDataCollator.")
            tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
            collator = HintedDataCollator(tokenizer, **self._hinted_collator_kwargs)
        if collator.max_length is None:
            collator.max_length = self.args.max_length
        if collator.completion_only_loss is None:
            collator.completion_only_loss = getattr(self, "completion_only_loss", True)
        self.data_collator = collator

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        c = self.data_collator if isinstance(self.data_collator, HintedDataCollator) else self._pending_hinted_collator
        extra = [c.question_column, c.reference_column, c.answer_column, c.prompt_column] if c is not None else [
            "question", "solution", "answer", "prompt"]
        self._signature_columns = list(dict.fromkeys(list(self._signature_columns) + [x for x in extra if x]))

    def _prepare_inputs(self, inputs):
        if isinstance(inputs, dict):
            inputs.pop(HINTED_KEY, None)  # evaluation batches keep the references
        return super()._prepare_inputs(inputs)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples = []
        for _ in range(num_batches):
            try:
                batch_samples.append(next(epoch_iterator))
            except StopIteration:
                break
        if batch_samples and HINTED_KEY in batch_samples[0]:
            batch_samples = self._realign_window(batch_samples)
        return batch_samples, self._get_num_items_in_batch(batch_samples, device)

    def _realign_window(self, batch_samples: list[dict]) -> list[dict]:
        from trl.models import unwrap_model_for_generation

        seed = None
        if self.args.seed is not None:
            rank, world = self.accelerator.process_index, self.accelerator.num_processes
            # one seed stream per (optimizer step, rank): reproducible, and continued correctly after a resume
            seed = (int(self.args.seed) * 1_000_003 + (self.state.global_step * world + rank) * 100_003) % (2**62)
        with unwrap_model_for_generation(
            self.model_wrapped, self.accelerator, gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs
        ) as unwrapped:
            new_batches, stats = self.data_collator.realign(unwrapped, batch_samples, seed=seed)
        keys = ("num_samples", "accepted", "lambda_sum", "response_tokens", "phi_sum", "phi_tokens")
        local = torch.tensor([stats[k] for k in keys], dtype=torch.float64, device=self.accelerator.device)
        total = dict(zip(keys, self.accelerator.gather(local[None]).sum(0).tolist()))
        metrics = self._metrics["train"]
        n = max(total["num_samples"], 1.0)
        metrics["hinted/acceptance_rate"].append(total["accepted"] / n)
        metrics["hinted/mean_lambda"].append(total["lambda_sum"] / n)
        metrics["hinted/response_tokens"].append(total["response_tokens"] / n)
        if total["phi_tokens"] > 0:
            metrics["hinted/mean_phi"].append(total["phi_sum"] / total["phi_tokens"])
        return new_batches


class OnlineSFTTrainer(OnlineHintedMixin, SFTTrainer):
    """`trl.SFTTrainer` trained on responses re-aligned online with the current weights (see the module doc)."""

    _tag_names = ["trl", "sft", "hinted-decoding", "trl-onpolicy"]


class OnlineIDFTTrainer(OnlineHintedMixin, IDFTTrainer):
    """`IDFTTrainer` trained on responses re-aligned online with the current weights (see the module doc)."""

    _tag_names = ["trl", "sft", "idft", "hinted-decoding", "trl-onpolicy"]


__all__ = ["OnlineHintedArguments", "HintedDataCollator", "HintedBatch", "OnlineHintedMixin", "OnlineSFTTrainer", "OnlineIDFTTrainer"]
