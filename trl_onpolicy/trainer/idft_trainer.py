"""`IDFTTrainer`: TRL's `SFTTrainer` with the on-policy token-loss family (IDFT, DFT, EAFT, NLL).

The math lives in `trl_onpolicy.losses`; this module only feeds it with TRL's fused LM head outputs (per-token
``log p`` and entropy, computed tile by tile without ``[B, T, V]`` logits) and reduces the result exactly like
`SFTTrainer.compute_loss` does, so everything SFTTrainer supports (padding-free, packing, gradient accumulation,
PEFT, assistant/completion-only loss, DDP, DeepSpeed, FSDP) keeps working.
"""

from __future__ import annotations

import contextlib
import textwrap
import warnings

import torch
from transformers import TrainingArguments
from trl import SFTTrainer
from trl.trainer.utils import maybe_gather_lm_head_ctx

from trl_onpolicy.trainer.idft_config import IDFTConfig, to_idft_config
from trl_onpolicy.losses import idft_schedule, token_loss
from trl_onpolicy.ops.lm_head import capture_hidden_states, lm_head_transform, token_statistics
from trl_onpolicy.trainer.online import OnlineHintedMixin


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
    with Hinted Decoding by the weights of the step that trains on it (`trl_onpolicy.trainer.online`).

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


class OnlineIDFTTrainer(IDFTTrainer):
    """`IDFTTrainer` that always trains online: without a ``data_collator`` it builds a `HintedDataCollator` from
    ``processing_class`` and ``hinted_collator_kwargs``. Kept for existing code:
    ``IDFTTrainer(..., data_collator=HintedDataCollator(tokenizer, **settings))`` is the same run."""

    _tag_names = ["trl", "sft", "trl-onpolicy", "hinted-decoding"]

    def __init__(self, model, args=None, data_collator=None, *pos_args, hinted_collator_kwargs: dict | None = None,
                 **kwargs):
        self._hinted_before_init(args, data_collator, hinted_collator_kwargs, required=True)
        super().__init__(model, args, data_collator, *pos_args, **kwargs)
        if self._hinted_collator is None:
            self._hinted_after_init(None, hinted_collator_kwargs, required=True)
