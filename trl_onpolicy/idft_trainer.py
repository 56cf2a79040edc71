"""`IDFTTrainer`: TRL's `SFTTrainer` with the on-policy token-loss family (IDFT, DFT, EAFT, NLL).

The math lives in `trl_onpolicy.losses`; this module only feeds it with TRL's fused LM head outputs (per-token
``log p`` and entropy, computed tile by tile without ``[B, T, V]`` logits) and reduces the result exactly like
`SFTTrainer.compute_loss` does, so everything SFTTrainer supports (padding-free, packing, gradient accumulation,
PEFT, assistant/completion-only loss, DDP, DeepSpeed, FSDP) keeps working.
"""

from __future__ import annotations

import contextlib
import copy
import textwrap
import warnings

import torch
from transformers import TrainingArguments
from trl import SFTTrainer
from trl.trainer.utils import maybe_gather_lm_head_ctx

from .idft_config import IDFTConfig, to_idft_config
from .losses import idft_schedule, token_loss
from .ops import capture_hidden_states, lm_head_transform, token_statistics


HINTED_KEY = "hinted"  # where a HintedDataCollator puts the raw fields of its batch


def is_hinted_collator(collator) -> bool:
    """Whether ``collator`` is a `trl_onpolicy.HintedDataCollator` (checked without importing Hinted Decoding)."""
    return bool(getattr(type(collator), "realigns_online", False))


class OnlineHintedMixin:
    """Online re-alignment (`trl_onpolicy.hinted_online`) for a trainer: a base of `IDFTTrainer`, and of
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
            from .hinted_online import HintedSettings

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
            from .hinted_online import HintedDataCollator

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


PAPER = {
    "title": "Towards On-Policy SFT: Distribution Discriminant Theory and its Applications in LLM Training",
    "id": "2602.12222",
    # docstyle-ignore
    "citation": textwrap.dedent("""\
        @article{zhang2026onpolicysft,
            title        = {{Towards On-Policy SFT: Distribution Discriminant Theory and its Applications in LLM Training}},
            author       = {Zhang and others},
            year         = 2026,
            journal      = {arXiv preprint arXiv:2602.12222},
        }"""),
}


class IDFTTrainer(OnlineHintedMixin, SFTTrainer):
    """Drop-in replacement for `trl.SFTTrainer` that trains with the token loss chosen by `IDFTConfig.token_loss`.

    Example:

    ```python
    from trl_onpolicy import IDFTConfig, IDFTTrainer

    trainer = IDFTTrainer(model="Qwen/Qwen2.5-Math-1.5B", args=IDFTConfig(output_dir="out"), train_dataset=dataset)
    trainer.train()
    ```

    It takes every `SFTTrainer` argument, in the same order. ``args`` may also be a `transformers.TrainingArguments`
    or a `trl.SFTConfig`: it is converted to `IDFTConfig` (our fields at their defaults, ``loss_type="dft"`` meaning
    ``token_loss="dft"``) with a warning, as SFTTrainer converts a `TrainingArguments`. ``compute_loss_func`` is
    refused (the trainer computes its own loss).

    With ``data_collator=HintedDataCollator(tokenizer, ...)`` it trains online on-policy: every batch is re-aligned
    with Hinted Decoding by the weights of the step that trains on it (`trl_onpolicy.hinted_online`).

    Besides SFTTrainer's `entropy` and `mean_token_accuracy` it logs `phi_mean`, `phi_std`, `phi_below_-1` (share of
    tokens with phi < -1), and for IDFT `gamma_mean` and `idft_lambda`, and `weight_mean` (mean token weight).
    """

    _tag_names = ["trl", "sft", "trl-onpolicy"]  # plus the token loss ("idft", "dft", ...) and "hinted-decoding" online
    _name = "IDFT"
    _paper = PAPER

    def __init__(
        self,
        model,
        args: IDFTConfig | TrainingArguments | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        compute_loss_func=None,
        compute_metrics=None,
        callbacks=None,
        optimizers=(None, None),
        optimizer_cls_and_kwargs=None,
        preprocess_logits_for_metrics=None,
        quantization_config=None,
        peft_config=None,
        formatting_func=None,
    ):
        if args is None:
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "model") or "model"
            args = IDFTConfig(f"{str(name).rstrip('/').split('/')[-1]}-IDFT")
        else:
            args = to_idft_config(args)
        if compute_loss_func is not None:
            raise ValueError(
                "IDFTTrainer computes its own token loss (IDFTConfig.token_loss); `compute_loss_func` cannot be "
                "combined with it. Drop `compute_loss_func`, or subclass IDFTTrainer and override `compute_loss`."
            )
        self._tag_names = list(dict.fromkeys([*type(self)._tag_names, args.token_loss]))
        hinted = self._hinted_before_init(args, data_collator)
        super().__init__(
            model, args, data_collator, train_dataset, eval_dataset, processing_class, None, compute_metrics, callbacks,
            optimizers, optimizer_cls_and_kwargs, preprocess_logits_for_metrics, quantization_config, peft_config,
            formatting_func,
        )
        self._hinted_after_init(hinted)
        pc = self.accelerator.parallelism_config
        if pc is not None and (getattr(pc, "sp_enabled", False) or getattr(pc, "cp_enabled", False)):
            raise ValueError(
                "IDFTTrainer does not support sequence/context parallelism (parallelism_config sp_size or cp_size > 1): "
                "the loss is reduced by the model itself there. Set sp_size=1 and cp_size=1."
            )
        self._vocab_size = self.model.config.get_text_config().vocab_size

    def idft_lambda(self) -> float:
        """Current value of the IDFT schedule, from the trainer state (so it survives checkpoint resumption)."""
        max_steps = self.state.max_steps if self.state is not None else 0
        progress = self.state.global_step / max_steps if max_steps and max_steps > 0 else None
        return idft_schedule(progress, self.args.idft_warmup_ratio, self.args.idft_transition_ratio)

    def _eaft_topk_entropy(self, hidden: torch.Tensor, mask: torch.Tensor, shifted: bool) -> torch.Tensor:
        if not shifted:
            hidden = hidden[:, :-1]
        unwrapped = self.accelerator.unwrap_model(self.model)
        head = unwrapped.get_output_embeddings()
        with maybe_gather_lm_head_ctx(head.weight, head.bias), torch.no_grad():
            stats = token_statistics(
                hidden[mask], head.weight, bias=head.bias, top_k=self.args.eaft_top_k, **lm_head_transform(unwrapped)
            )
        return torch.zeros(mask.shape, device=mask.device).masked_scatter(mask, stats["topk_entropy"])

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        args = self.args
        mode = "train" if self.model.training else "eval"
        inputs["use_cache"] = False
        if self.aux_loss_enabled:
            inputs["output_router_logits"] = True

        needs_hidden = args.token_loss == "eaft" and args.eaft_entropy == "topk"
        capture = capture_hidden_states(self.model) if needs_hidden else contextlib.nullcontext({})
        with capture as captured:
            outputs = model(**inputs, fused_lm_head=True)
        mask = outputs.label_mask

        lam = self.idft_lambda() if args.token_loss == "idft" else 1.0
        weight_kwargs = dict(beta=args.idft_beta, gamma_min=args.idft_gamma_min, gamma_max=args.idft_gamma_max, schedule=lam)
        if args.token_loss == "eaft":
            if needs_hidden:
                weight_kwargs.update(
                    eaft_entropy=self._eaft_topk_entropy(captured["hidden"], mask, "shift_labels" in inputs),
                    # the top-k entropy uses min(k, |V|) logits: normalise by the log of that count, not of k
                    eaft_num_classes=min(args.eaft_top_k, self._vocab_size),
                )
            else:
                weight_kwargs.update(eaft_entropy=outputs.entropy, eaft_num_classes=self._vocab_size)
        per_token, stats = token_loss(
            args.token_loss, outputs.log_probs, outputs.entropy, detach=args.idft_detach, **weight_kwargs
        )
        per_token = per_token * mask
        num_tokens = mask.sum() if num_items_in_batch is None else num_items_in_batch
        loss = per_token.sum() / torch.as_tensor(num_tokens).clamp(min=1)
        # As in SFTTrainer: num_items_in_batch counts every rank's tokens while DDP averages gradients across ranks
        if args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        if self.aux_loss_enabled:
            steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss / steps

        self._log_token_metrics(mode, inputs, outputs, stats, lam)

        if return_outputs:
            warnings.warn(
                "return_outputs=True recomputes the full logits with an extra forward pass (the fused LM head does not "
                "build them).",
                stacklevel=2,
            )
            with torch.no_grad():
                outputs = model(**{k: v for k, v in inputs.items() if k != "labels"})
            return loss, outputs
        return loss

    def _log_token_metrics(self, mode, inputs, outputs, stats, lam):
        mask = outputs.label_mask
        m = mask.float()
        phi = (outputs.log_probs.detach().float() + outputs.entropy.detach().float()) * m
        gamma = stats.get("gamma", torch.ones_like(phi))
        sums = torch.stack(
            [
                m.sum(),
                outputs.entropy.detach().float().mul(m).sum(),
                outputs.is_top1.float().mul(m).sum(),
                phi.sum(),
                phi.pow(2).sum(),
                ((phi < -1) & mask).float().sum(),
                gamma.float().mul(m).sum(),
                stats["weight"].float().mul(m).sum(),
            ]
        )
        n, ent, top1, phi_s, phi_sq, below, gamma_s, weight_s = self.accelerator.gather_for_metrics(sums[None]).sum(0).tolist()
        metrics = self._metrics[mode]
        safe = max(n, 1.0)
        metrics["entropy"].append(ent / safe)
        metrics["mean_token_accuracy"].append(top1 / safe)
        mean_phi = phi_s / safe
        metrics["phi_mean"].append(mean_phi)
        metrics["phi_std"].append(max(phi_sq / safe - mean_phi**2, 0.0) ** 0.5)
        metrics["phi_below_-1"].append(below / safe)
        metrics["weight_mean"].append(weight_s / safe)
        if self.args.token_loss == "idft":
            metrics["gamma_mean"].append(gamma_s / safe)
            metrics["idft_lambda"].append(lam)

        if mode == "train":
            if "attention_mask" in inputs:
                local = inputs["attention_mask"].sum()
            else:
                local = torch.tensor(inputs["position_ids"].size(1), device=inputs["position_ids"].device)
            self._total_train_tokens += self.accelerator.gather_for_metrics(local).sum().item() // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]
        if self.aux_loss_enabled:
            metrics["aux_loss"].append(self.accelerator.gather_for_metrics(outputs.aux_loss).mean().item())
