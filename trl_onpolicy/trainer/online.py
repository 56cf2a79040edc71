"""Online Hinted Decoding: re-align every training batch with the CURRENT weights, just before training on it.

Offline re-alignment (`trl-onpolicy realign`) makes a corpus on-policy for the model as it was *before* training;
as the weights move, the corpus drifts off-policy again. Online mode regenerates each batch's responses with the
weights of the very optimizer step that trains on them (zero staleness). The switch is the collator::

    trainer = IDFTTrainer(model, args, train_dataset=ds, data_collator=HintedDataCollator(tokenizer, beta=3.0))

- `HintedDataCollator` collates the ordinary tokenized batch (the reference responses, so evaluation and fallbacks
  work as usual) and keeps, beside it, each sample's plain prompt ids (rendered exactly as SFTTrainer renders the
  training prompt: same chat template, ``tools`` and ``chat_template_kwargs``), question, reference and answer.
- `OnlineHintedMixin` (in `trl_onpolicy.trainer.idft_trainer`: a base of `IDFTTrainer`, so every IDFTTrainer has it; it
  recognises the collator without importing this module) is active whenever the
  trainer's ``data_collator`` is a `HintedDataCollator`. It keeps the columns the collator reads whatever
  ``remove_unused_columns`` says, and overrides `Trainer.get_batch_samples`, which the training loop calls once per
  optimizer step to fetch the whole gradient-accumulation window. There, under `trl.models.unwrap_model_for_generation`
  (which gathers ZeRO-3 shards and pauses gradient checkpointing), it runs `hinted_decode` for every sample of the
  window, rebuilds the micro-batches from ``plain prompt + generated response`` and recounts ``num_items_in_batch``.
  The weights that generate are therefore exactly those the following forward/backward passes use.

  A collator that generates by itself would be one optimizer step stale: accelerate's dataloader reads one batch
  ahead, so the collator runs before the previous step's update. That is why a plain `trl.SFTTrainer`, which has no
  such hook, cannot use this collator: its first batch raises an error saying to use `IDFTTrainer` (or
  `OnlineSFTTrainer`, i.e. SFTTrainer with the mixin), instead of silently training on the references.

- `OnlineSFTTrainer` is `trl.SFTTrainer` with the mixin (plain NLL on the re-aligned responses); `OnlineIDFTTrainer`
  is `IDFTTrainer` that builds a default collator from ``hinted_collator_kwargs``. Both are kept for existing code;
  ``IDFTTrainer(data_collator=HintedDataCollator(...))`` is the one path.

A generated response is *accepted* by the offline filters' rule (`trl_onpolicy.hinted.acceptance.accept_response`): it ended
with EOS and (unless the checker is "none") its final answer is correct against the answer column, or, without one,
against the reference solution's final answer; a rejected one is replaced by the reference response
(``on_reject="reference"``, default) or trained on anyway (``on_reject="keep"``). Logged each step:
``hinted/acceptance_rate``, ``hinted/mean_phi`` (DDT mean phi of the generated responses under the plain prompt,
current weights; ``compute_phi``), ``hinted/mean_lambda`` and ``hinted/response_tokens``.

Requirements: a question column and a reference column in the training dataset (a
`trl_onpolicy.data.datasets.math_word_problems` dataset has `prompt`, `completion`, `question`, `solution`, `answer`; an eval
dataset needs the same columns, its batches keep the references); ``padding_free=False`` and ``packing=False``.
Recipes: `OnlineHintedArguments` (``hinted_online: true`` plus one ``hinted_<setting>`` field per collator setting,
derived from `HintedSettings`) is parsed by `trl-onpolicy train`.
"""

from __future__ import annotations

import copy
import dataclasses
import typing
from dataclasses import dataclass, field

import torch
from trl import SFTTrainer
from trl.data_utils import common_prefix_length
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from trl_onpolicy.data.prompts import render_prompt_ids
from trl_onpolicy.hinted.acceptance import accept_response, completion_text, resolve_checker, response_statistics
from trl_onpolicy.hinted.prompts import DEFAULT_HINT_TEMPLATE, MESSAGES_COLUMN, build_hinted_prompt_ids, plain_prompt
from trl_onpolicy.hinted.sampling import LAMBDA_MODES
from trl_onpolicy.utils.generation import eos_token_ids
from trl_onpolicy.utils.validation import COUNT, OPTIONAL_COUNT, PROBABILITY_OPEN_LOW, Range, check_choice, check_fields

HINTED_KEY = "hinted"  # where a HintedDataCollator puts the raw fields of its batch
ON_REJECT_CHOICES = ("reference", "keep")
RECIPE_PREFIX = "hinted_"


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
    contexts: list = field(default_factory=list)  # each row's plain prompt when it is a conversation, else None

    def __len__(self):
        return len(self.questions)


@dataclass
class HintedSettings:
    r"""
    Settings of online Hinted Decoding: the one definition behind `HintedDataCollator`'s keyword arguments and the
    recipe fields of `OnlineHintedArguments` (``hinted_<name>``, same help).

    Parameters:
        question_column, reference_column, answer_column, prompt_column (`str`):
            Dataset columns. The plain prompt is `prompt_column` (the ordinary training prompt) when the sample has
            it, else the conversation before the last assistant turn of a ``messages`` row (system and earlier
            turns kept), else the chat template on the question (after `system_prompt`). The gold answer is
            `answer_column`, or the reference when it is `None` or absent.
        hint_template, system_prompt, analysis_max_new_tokens:
            The hinted (shadow) prompt, as in `trl_onpolicy.hinted.prompts`.
        beta, lambda_mode, lambda_center, lambda_h1, lambda_h2, splitter, max_new_tokens, temperature, top_p:
            Passed to `trl_onpolicy.hinted.decoding.hinted_decode`.
        checker (`str` or callable), on_reject, generation_batch_size, compute_phi:
            Acceptance and logging (see the field help).
    """

    question_column: str = field(default="question", metadata={"help": "Column with the problem."})
    reference_column: str = field(default="solution", metadata={"help": "Column with the reference solution."})
    answer_column: str | None = field(
        default="answer", metadata={"help": "Column with the final answer; None: the reference is the gold."}
    )
    prompt_column: str | None = field(
        default="prompt",
        metadata={"help": "Column with the plain (training) prompt; None or absent: the conversation before the last "
                          "assistant turn of a `messages` row, else the chat template on the question."},
    )
    hint_template: str = field(
        default=DEFAULT_HINT_TEMPLATE,
        metadata={"help": "User turn of the hinted stream; must contain {question} and {reference}."},
    )
    system_prompt: str | None = field(
        default=None, metadata={"help": "System turn of the hinted prompt (and of a plain prompt built from the question)."}
    )
    analysis_max_new_tokens: int = field(
        default=0, metadata={"help": "If > 0, the hinted stream first writes an analysis of this many tokens at most."}
    )
    beta: float = field(default=3.0, metadata={"help": "Hinted Decoding beta (strength of the hint), >= 0."})
    lambda_mode: str = field(
        default="linear",
        metadata={"help": "Entropy-to-lambda map: linear, sigmoid or piecewise.", "choices": list(LAMBDA_MODES)},
    )
    lambda_center: float = field(default=0.5, metadata={"help": "Centre of the sigmoid lambda map."})
    lambda_h1: float = field(default=0.1, metadata={"help": "Lower entropy knot of the piecewise lambda map."})
    lambda_h2: float = field(default=0.4, metadata={"help": "Upper entropy knot of the piecewise lambda map."})
    splitter: str | None = field(
        default="\\boxed{", metadata={"help": "After this text is generated, only the plain stream decodes."}
    )
    max_new_tokens: int = field(default=256, metadata={"help": "Maximum generated tokens per response."})
    temperature: float = field(default=0.3, metadata={"help": "Sampling temperature (0: greedy)."})
    top_p: float = field(default=0.95, metadata={"help": "Top-p of the sampler, in (0, 1]."})
    checker: str | None = field(
        default="math_verify",
        metadata={"help": "Answer checker (math_verify, numeric, exact, contains, module:function) or 'none'."},
    )
    on_reject: str = field(
        default="reference",
        metadata={"help": "A rejected response: 'reference' (train on the reference) or 'keep'.",
                  "choices": list(ON_REJECT_CHOICES)},
    )
    generation_batch_size: int | None = field(
        default=None, metadata={"help": "Samples decoded together (default: the whole accumulation window)."}
    )
    compute_phi: bool = field(
        default=True, metadata={"help": "Log hinted/mean_phi (one extra forward without gradients per step)."}
    )

    def __post_init__(self):
        owner = "HintedDataCollator"
        check_choice("lambda_mode", self.lambda_mode, LAMBDA_MODES, owner)
        check_choice("on_reject", self.on_reject, ON_REJECT_CHOICES, owner)
        check_fields(self, {
            "beta": Range(lo=0), "lambda_center": Range(), "lambda_h1": Range(), "lambda_h2": Range(),
            "max_new_tokens": COUNT, "temperature": Range(lo=0), "top_p": PROBABILITY_OPEN_LOW,
            "analysis_max_new_tokens": Range(lo=0, integer=True), "generation_batch_size": OPTIONAL_COUNT,
        }, owner)
        if self.lambda_mode == "piecewise" and not self.lambda_h1 < self.lambda_h2:
            raise ValueError(f"{owner}.lambda_h1={self.lambda_h1!r} is invalid: piecewise mode needs lambda_h1 < "
                             f"lambda_h2={self.lambda_h2!r}.")
        for key in ("{question}", "{reference}"):
            if key not in self.hint_template:
                raise ValueError(f"{owner}.hint_template is invalid: it must contain {key}.")
        for name in ("question_column", "reference_column"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"{owner}.{name}={getattr(self, name)!r} is invalid: expected a column name.")


def _online_arguments_class():
    """`OnlineHintedArguments`: ``hinted_online`` plus ``hinted_<name>`` for every `HintedSettings` field (same
    type, default and help), so that recipes and the collator share one definition."""
    hints = typing.get_type_hints(HintedSettings)
    specs = [("hinted_online", bool, field(default=False, metadata={
        "help": "Train with online Hinted Decoding: every batch is re-aligned with the current weights "
                "(IDFTTrainer + HintedDataCollator; the hinted_* fields are its settings)."}))]
    for f in dataclasses.fields(HintedSettings):
        specs.append((RECIPE_PREFIX + f.name, hints[f.name], field(default=f.default, metadata=dict(f.metadata))))
    doc_lines = ["Online Hinted Decoding settings of a recipe (`trl-onpolicy train`): ``hinted_online`` turns it on;",
                 "each ``hinted_<name>`` field is the `HintedDataCollator`/`HintedSettings` argument ``<name>``.", "",
                 "Parameters:"]
    for name, _, f in specs:
        doc_lines.append(f"    {name} (default {f.default!r}): {f.metadata['help']}")
    cls = dataclasses.make_dataclass("OnlineHintedArguments", specs, namespace={
        "collator_kwargs": lambda self: {f.name: getattr(self, RECIPE_PREFIX + f.name) for f in dataclasses.fields(HintedSettings)},
        "__doc__": "\n".join(doc_lines),
    })
    cls.__module__ = __name__
    return cls


OnlineHintedArguments = _online_arguments_class()


def realigned_labels(prompt: list[int], response: list[int], reference_ids: list[int], reference_labels: list[int], *,
                     trains_every_token: bool) -> list[int]:
    """Labels of ``prompt + response`` under SFTTrainer's mask of the reference sequence: on the prompt tokens the
    reference shares (its longest common prefix with the prompt) the reference's labels, which say what SFTTrainer's
    completion-only or assistant-only mask trains there; on the rest of the prompt -100 (or the ids when the trainer
    trains every token); on the response, the ids."""
    shared = common_prefix_length(list(prompt), list(reference_ids))
    rest = list(prompt[shared:]) if trains_every_token else [-100] * (len(prompt) - shared)
    return list(reference_labels[:shared]) + rest + list(response)


class HintedDataCollator:
    """The switch for online on-policy SFT: pass it as ``data_collator`` to `trl_onpolicy.IDFTTrainer` and every batch
    is re-aligned with the current weights (see the module doc). With a plain `trl.SFTTrainer` its first batch raises
    (SFTTrainer has no hook to generate with the weights of the step, and would train on the references).

    On its own it returns TRL's ordinary padded batch of the reference responses plus a `HintedBatch` under the
    ``"hinted"`` key; the trainer then replaces the responses with ones generated by the current weights (`realign`).

    Args:
        tokenizer: the model's tokenizer (with a chat template for conversational prompts).
        **settings: the fields of `HintedSettings` (columns, hinted prompt, decoding, acceptance, phi logging);
            ``checker`` may also be a callable ``(extracted_answer, gold) -> bool``.
        max_length, completion_only_loss, assistant_only_loss, chat_template, pad_token_id: set from the trainer
            (its config, its completion-only decision, ``args.assistant_only_loss`` and its training chat template)
            when left None, on the trainer's own copy (``trainer.data_collator``): the object passed stays as it
            was, and unattached.

    A re-aligned sample is ``plain prompt + generated response`` and keeps SFTTrainer's loss mask: on the prompt
    tokens it shares with the reference sequence, the reference's labels (what SFTTrainer's completion-only or
    assistant-only mask gave them: system and user turns -100, earlier assistant turns as the mask says); on the
    generated response, the ids. Prompt tokens past the shared part are -100 unless the trainer trains every token.
    """

    realigns_online = True  # recognised by OnlineHintedMixin (without importing this module)

    def __init__(self, tokenizer, *, max_length: int | None = None, completion_only_loss: bool | None = None,
                 assistant_only_loss: bool | None = None, chat_template: str | None = None,
                 pad_token_id: int | None = None, **settings):
        unknown = sorted(set(settings) - {f.name for f in dataclasses.fields(HintedSettings)})
        if unknown:
            raise TypeError(f"HintedDataCollator got unknown setting(s) {unknown}; the settings are the fields of "
                            f"HintedSettings: {[f.name for f in dataclasses.fields(HintedSettings)]}.")
        self.settings = s = HintedSettings(**settings)  # validates; `checker` may be a callable here
        self.tokenizer = tokenizer
        self.question_column, self.reference_column = s.question_column, s.reference_column
        self.answer_column, self.prompt_column = s.answer_column, s.prompt_column
        self.hint_template, self.system_prompt = s.hint_template, s.system_prompt
        self.analysis_max_new_tokens = s.analysis_max_new_tokens
        self.decode_kwargs = dict(beta=s.beta, lambda_mode=s.lambda_mode, lambda_center=s.lambda_center,
                                  lambda_h1=s.lambda_h1, lambda_h2=s.lambda_h2, splitter=s.splitter,
                                  max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p)
        self.checker = resolve_checker(s.checker)
        self.on_reject = s.on_reject
        self.generation_batch_size = s.generation_batch_size
        self.compute_phi = s.compute_phi
        self.max_length = max_length
        self.completion_only_loss = completion_only_loss
        self.assistant_only_loss = assistant_only_loss
        self.chat_template = chat_template
        if pad_token_id is None:
            pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_token_id = pad_token_id
        self.attached_to: str | None = None  # set by the trainer that re-aligns (OnlineHintedMixin)

    def attach(self, owner: str) -> None:
        """Mark the collator as driven by a trainer that re-aligns its batches (called by `OnlineHintedMixin`)."""
        self.attached_to = owner

    @property
    def columns(self) -> list[str]:
        """Dataset columns the collator reads (kept by the trainer whatever ``remove_unused_columns`` says)."""
        cols = [self.question_column, self.reference_column, self.answer_column, self.prompt_column, MESSAGES_COLUMN,
                "tools", "chat_template_kwargs"]
        return list(dict.fromkeys(c for c in cols if c))

    # -- collation ----------------------------------------------------------------------------------------------------

    def _pad(self, input_ids, labels) -> dict:
        return DataCollatorForLanguageModeling(pad_token_id=self.pad_token_id)(
            [{"input_ids": i, "labels": lab} for i, lab in zip(input_ids, labels)]
        )

    def plain_prompt(self, example: dict):
        """The plain prompt of one example (`trl_onpolicy.hinted.prompts.plain_prompt`: the prompt column, else the
        conversation before the last assistant turn of a ``messages`` row, else the question)."""
        return plain_prompt(example, prompt_column=self.prompt_column, question_column=self.question_column,
                            system_prompt=self.system_prompt)

    def plain_prompt_ids(self, example: dict, prompt=None) -> list[int]:
        """`plain_prompt` (or ``prompt``, already built from ``example``) rendered exactly as SFTTrainer renders its
        training prompt."""
        prompt = self.plain_prompt(example) if prompt is None else prompt
        return render_prompt_ids(self.tokenizer, prompt, chat_template=self.chat_template, example=example)

    def __call__(self, examples: list[dict]) -> dict:
        if self.attached_to is None:
            raise RuntimeError(
                "HintedDataCollator re-aligns batches only inside trl_onpolicy.IDFTTrainer (or OnlineSFTTrainer); this "
                "trainer would train on the references: use IDFTTrainer(..., data_collator=HintedDataCollator(...))."
            )
        missing = [c for c in ("input_ids", self.question_column, self.reference_column) if c not in examples[0]]
        if missing:
            raise ValueError(
                f"HintedDataCollator: the examples have no {missing} (they have {sorted(examples[0])}). Use a "
                "dataset with question and reference columns (set question_column/reference_column)."
            )
        input_ids = [list(ex["input_ids"]) for ex in examples]
        labels = [list(ex.get("labels", ex["input_ids"])) for ex in examples]
        batch = self._pad(input_ids, labels)

        def gold(ex):  # None: `accept_response` grades against the reference solution's final answer
            value = ex.get(self.answer_column) if self.answer_column else None
            return None if value in (None, "") else str(value)

        prompts = [self.plain_prompt(ex) for ex in examples]  # built once: rendered for decoding, kept for the hint
        batch[HINTED_KEY] = HintedBatch(
            plain_prompt_ids=[self.plain_prompt_ids(ex, p) for ex, p in zip(examples, prompts)],
            questions=[str(ex[self.question_column]) for ex in examples],
            references=[str(ex[self.reference_column]) for ex in examples],
            answers=[gold(ex) for ex in examples],
            reference_input_ids=input_ids,
            reference_labels=labels,
            contexts=prompts,
        )
        return batch

    # -- re-alignment ---------------------------------------------------------------------------------------------------

    def _sequence(self, prompt: list[int], response: list[int], reference_ids: list[int],
                  reference_labels: list[int]) -> tuple[list[int], list[int]]:
        every = self.completion_only_loss is False and not self.assistant_only_loss
        ids = list(prompt) + list(response)
        labels = realigned_labels(prompt, response, reference_ids, reference_labels, trains_every_token=every)
        if self.max_length is not None:
            ids, labels = ids[: self.max_length], labels[: self.max_length]
        return ids, labels

    @torch.no_grad()
    def realign(self, model, batches: list[dict], *, seed: int | None = None) -> tuple[list[dict], dict]:
        """Replace the responses of every batch in ``batches`` (one accumulation window) by hinted-decoding
        responses of ``model`` (already unwrapped for generation). Returns the new batches (tensors on the device of
        the old ones) and statistics: sums and counts for acceptance, phi, lambda and response tokens."""
        from trl_onpolicy.hinted.decoding import hinted_decode

        parts = [b[HINTED_KEY] for b in batches]
        flat = lambda attr: [x for p in parts for x in getattr(p, attr)]  # noqa: E731
        plain, questions, references = flat("plain_prompt_ids"), flat("questions"), flat("references")
        answers, ref_ids, ref_labels = flat("answers"), flat("reference_input_ids"), flat("reference_labels")
        hinted, _ = build_hinted_prompt_ids(
            model, self.tokenizer, questions, references, template=self.hint_template, system_prompt=self.system_prompt,
            analysis_max_new_tokens=self.analysis_max_new_tokens, chat_template=self.chat_template,
            contexts=flat("contexts") or None,
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
                    ids, labels = self._sequence(plain[k], responses[k], ref_ids[k], ref_labels[k])
                else:
                    ids, labels = ref_ids[k], ref_labels[k]
                ids_list.append(ids)
                labels_list.append(labels)
                k += 1
            device = batch["input_ids"].device
            new = {key: value.to(device) for key, value in self._pad(ids_list, labels_list).items()}
            new_batches.append(new)
        return new_batches, stats


def is_hinted_collator(collator) -> bool:
    """Whether ``collator`` is a `trl_onpolicy.HintedDataCollator` (checked without importing Hinted Decoding)."""
    return bool(getattr(type(collator), "realigns_online", False))


class OnlineHintedMixin:
    """Online re-alignment (`trl_onpolicy.trainer.online`) for a trainer: a base of `IDFTTrainer`, and of
    ``class T(OnlineHintedMixin, SFTTrainer)`` for others. Active when the trainer's ``data_collator`` is a
    `HintedDataCollator`; otherwise it changes nothing.

    Subclasses call `_hinted_before_init` before ``SFTTrainer.__init__`` (checks, tags) and `_hinted_after_init` after
    it (fills the collator's trainer-dependent settings and attaches it)."""

    _hinted_collator = None  # the HintedDataCollator when training online

    def _hinted_before_init(self, args, data_collator, hinted_collator_kwargs=None, required: bool = False):
        """Validate an online setup before any work; returns the `HintedDataCollator` passed, or None."""
        if data_collator is not None and not is_hinted_collator(data_collator):
            if required:
                raise TypeError(f"{type(self).__name__} needs a HintedDataCollator (or none, for a default one), got "
                                f"{type(data_collator).__name__}.")
            return None
        if data_collator is not None and hinted_collator_kwargs:
            raise ValueError("Pass either data_collator or hinted_collator_kwargs, not both.")
        online = required or data_collator is not None
        if not online:
            return None
        if hinted_collator_kwargs:
            HintedSettings(**hinted_collator_kwargs)  # bad settings fail before the model and data are prepared
        if args is not None:
            for name in ("padding_free", "packing"):
                if getattr(args, name, False):
                    raise ValueError(
                        f"{type(args).__name__}.{name}=True is invalid with a HintedDataCollator: online Hinted "
                        "Decoding rebuilds each batch from whole samples; set padding_free=False and packing=False."
                    )
        self._tag_names = list(dict.fromkeys([*self._tag_names, "hinted-decoding"]))
        return data_collator

    def _hinted_after_init(self, collator=None, hinted_collator_kwargs=None, required=False):
        if collator is None:
            if not required:
                return
            if self.processing_class is None:
                raise ValueError("Pass processing_class (the tokenizer) or a HintedDataCollator.")
            tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
            collator = HintedDataCollator(tokenizer, **(hinted_collator_kwargs or {}))
        else:
            # the trainer's own copy: the user's object stays unattached (handed later to a plain SFTTrainer it still
            # refuses instead of training on the references) and keeps no settings filled from this trainer
            collator = copy.copy(collator)
        if collator.max_length is None:
            collator.max_length = self.args.max_length
        if collator.completion_only_loss is None:
            collator.completion_only_loss = getattr(self, "completion_only_loss", True)
        if collator.assistant_only_loss is None:
            collator.assistant_only_loss = bool(getattr(self.args, "assistant_only_loss", False))
        if collator.chat_template is None:
            collator.chat_template = getattr(self, "chat_template", None)  # SFTTrainer's training template, if any
        self._check_hinted_columns(collator)
        collator.attach(type(self).__name__)
        self._hinted_collator = collator
        self.data_collator = collator

    def _check_hinted_columns(self, collator) -> None:
        """A dataset without the collator's question/reference columns: one line at construction, not at batch 1."""
        evals = self.eval_dataset if isinstance(self.eval_dataset, dict) else {"": self.eval_dataset}
        for name, dataset in [("train_dataset", self.train_dataset)] + [
            (f"eval_dataset{'[' + repr(k) + ']' if k else ''}", d) for k, d in evals.items()
        ]:
            columns = getattr(dataset, "column_names", None)
            if dataset is None or columns is None:  # an IterableDataset may not know its columns
                continue
            missing = [c for c in (collator.question_column, collator.reference_column) if c not in columns]
            if missing:
                raise ValueError(
                    f"{type(self).__name__}: {name} has no column(s) {missing} that the HintedDataCollator reads (it "
                    f"has {sorted(columns)}); set the collator's question_column/reference_column to its columns."
                )

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if self._hinted_collator is not None:
            self._signature_columns = list(dict.fromkeys([*self._signature_columns, *self._hinted_collator.columns]))

    def _prepare_inputs(self, inputs):
        if isinstance(inputs, dict):
            inputs.pop(HINTED_KEY, None)  # evaluation batches keep the references
        return super()._prepare_inputs(inputs)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        if self._hinted_collator is None:
            return super().get_batch_samples(epoch_iterator, num_batches, device)
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
            new_batches, stats = self._hinted_collator.realign(unwrapped, batch_samples, seed=seed)
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
    """`trl.SFTTrainer` (plain NLL) trained on responses re-aligned online with the current weights. Takes every
    SFTTrainer argument plus ``hinted_collator_kwargs`` (settings of the default collator built when
    ``data_collator`` is None)."""

    _tag_names = ["trl", "sft", "hinted-decoding", "trl-onpolicy"]

    def __init__(self, model, args=None, data_collator=None, *pos_args, hinted_collator_kwargs: dict | None = None,
                 **kwargs):
        collator = self._hinted_before_init(args, data_collator, hinted_collator_kwargs, required=True)
        super().__init__(model, args, collator, *pos_args, **kwargs)
        self._hinted_after_init(collator, hinted_collator_kwargs, required=True)


__all__ = ["HintedSettings", "OnlineHintedArguments", "HintedDataCollator", "HintedBatch", "OnlineHintedMixin",
           "OnlineSFTTrainer", "realigned_labels"]
