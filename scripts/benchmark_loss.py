#!/usr/bin/env python
"""Training-step time and peak memory of IDFTTrainer vs SFTTrainer vs a "reference-style" IDFT loss, in one run.

Variants (same model weights, same batch, same optimizer and settings):

- ``sft``: TRL's `SFTTrainer` with its default loss (NLL on TRL's fused, tiled LM head);
- ``idft``: `trl_onpolicy.IDFTTrainer` with ``token_loss="idft"`` (the same fused head, plus entropy);
- ``reference``: `SFTTrainer` whose `compute_loss` does what the IDFT authors' code does: full ``[B, T, V]``
  logits, a float32 ``log_softmax`` and ``softmax`` over the whole vocabulary, the entropy from them, then the IDFT
  weight ``sg(p ** gamma)``.

Every run of a variant is its own subprocess, so its peak memory is clean: on CPU the peak resident set size
(``ru_maxrss``) and its growth during training (grads, optimizer state, activations); on CUDA
``torch.cuda.max_memory_allocated``. Variants are interleaved (``--repeats`` rounds, rotating the order) to spread
the noise of a shared machine; each run does ``--warmup`` untimed steps, then ``--steps`` timed optimizer steps
(forward, backward, optimizer), and the table reports medians with ratios against ``sft``.

Presets:

- default (CPU): a randomly initialised SmolLM2-shaped Llama (vocabulary 49152, hidden 576, ``--num_layers`` 2),
  sequence 2048, batch 1, gradient checkpointing on (TRL's default), float32. With 2 layers the LM head and the
  loss dominate the step: the least favourable case for any loss overhead.
  ``--model embedded:smollm2-135m-instruct`` uses the real 30-layer model instead (much slower on CPU).
- ``--gpu``: a Qwen2.5-1.5B-shaped Qwen2 (vocabulary 151936, hidden 1536, 4 layers), sequence 4096, batch 1,
  gradient checkpointing on, bf16.

Example: ``python scripts/benchmark_loss.py --repeats 2 --output_json bench.json``
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

VARIANTS = ("sft", "idft", "reference")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpu", action="store_true", help="GPU preset: vocab 151936, seq 4096, bf16, CUDA memory stats")
    p.add_argument("--model", default=None, help="local folder / embedded alias instead of a random model")
    p.add_argument("--vocab_size", type=int, default=None)
    p.add_argument("--hidden_size", type=int, default=None)
    p.add_argument("--num_layers", type=int, default=None)
    p.add_argument("--seq_len", type=int, default=None)
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--no_gradient_checkpointing", action="store_true")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per run")
    p.add_argument("--steps", type=int, default=3, help="timed steps per run")
    p.add_argument("--repeats", type=int, default=2, help="interleaved rounds of all variants")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    p.add_argument(
        "--inprocess",
        action="store_true",
        help="time only, in ONE process: all variants built side by side and stepped in turn (sft, idft, reference, "
        "sft, ...), so a shared machine's load hits them alike; no memory figures",
    )
    p.add_argument(
        "--loss_only",
        action="store_true",
        help="time only the token-loss math and its backward on [seq_len] vectors (IDFT vs plain NLL), no model",
    )
    p.add_argument("--output_json", default=None)
    p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_result", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    preset = (
        dict(arch="qwen2", vocab_size=151936, hidden_size=1536, num_layers=4, seq_len=4096)
        if args.gpu
        else dict(arch="llama", vocab_size=49152, hidden_size=576, num_layers=2, seq_len=2048)
    )
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.gradient_checkpointing = not args.no_gradient_checkpointing
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(args.variants) - set(VARIANTS)
    if unknown or "sft" not in args.variants:
        p.error(f"--variants must include 'sft' (the baseline) and only {VARIANTS}; got {args.variants}")
    return args


# ------------------------------------------------------------------------------------------------------------ worker


def _build_model(args):
    import torch

    if args.model:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from trl_onpolicy.utils.models import resolve_model_path

        path = resolve_model_path(args.model)
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), AutoTokenizer.from_pretrained(path)

    from trl_onpolicy.testing.tiny import make_tiny_tokenizer

    tok = make_tiny_tokenizer()
    torch.manual_seed(0)
    if args.arch == "qwen2":
        from transformers import Qwen2Config as Config, Qwen2ForCausalLM as Model

        heads = max(1, args.hidden_size // 128)
        kv = 2 if heads % 2 == 0 else 1
        # Qwen2.5-1.5B: hidden 1536, MLP 8960, 12 heads of 128, 2 KV heads
        extra = dict(intermediate_size=35 * args.hidden_size // 6, num_attention_heads=heads, num_key_value_heads=kv)
    else:
        from transformers import LlamaConfig as Config, LlamaForCausalLM as Model

        heads = max(1, args.hidden_size // 64)
        kv = 3 if heads % 3 == 0 else 1
        # SmolLM2-135M: hidden 576, MLP 1536, 9 heads of 64, 3 KV heads
        extra = dict(intermediate_size=8 * args.hidden_size // 3, num_attention_heads=heads, num_key_value_heads=kv)
    config = Config(
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        num_hidden_layers=args.num_layers,
        max_position_embeddings=max(4096, args.seq_len),
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
        **extra,
    )
    return Model(config), tok


def _reference_trainer_class():
    import torch
    from trl import SFTTrainer

    class ReferenceStyleIDFTTrainer(SFTTrainer):
        """IDFT computed the way the authors' code does it: every step materialises full-vocabulary fp32 softmax."""

        beta, gamma_min, gamma_max = 1.0, 0.1, 2.0

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs.pop("labels")
            inputs["use_cache"] = False
            logits = model(**inputs).logits  # [B, T, V]
            logits = logits[:, :-1].float()
            labels = labels[:, 1:]
            mask = labels != -100
            log_probs_all = torch.log_softmax(logits, dim=-1)  # [B, T, V] fp32
            with torch.no_grad():
                probs_all = torch.softmax(logits, dim=-1)  # [B, T, V] fp32
                entropy = -(probs_all * log_probs_all).sum(-1)
            log_p = log_probs_all.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            phi = (log_p + entropy).detach()
            gamma = torch.exp(-phi / self.beta).clamp(self.gamma_min, self.gamma_max)
            weight = torch.exp(gamma * log_p).detach()
            per_token = -(weight * log_p) * mask
            denom = mask.sum() if num_items_in_batch is None else num_items_in_batch
            return per_token.sum() / torch.as_tensor(denom).clamp(min=1)

    return ReferenceStyleIDFTTrainer


def make_trainer(variant: str, args, callbacks=()):
    """The trainer of one variant on a freshly built model (same weights and data for every variant)."""
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from trl_onpolicy import IDFTConfig, IDFTTrainer

    cuda = torch.cuda.is_available()
    model, tok = _build_model(args)
    vocab = model.config.get_text_config().vocab_size
    total_steps = args.warmup + args.steps
    gen = torch.Generator().manual_seed(1234)
    rows = torch.randint(0, vocab, (total_steps * args.batch_size, args.seq_len), generator=gen).tolist()
    dataset = Dataset.from_dict({"input_ids": rows})

    common = dict(
        output_dir=tempfile.mkdtemp(prefix=f"bench-{variant}-"),
        max_steps=total_steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=1e-5,
        max_length=args.seq_len,
        gradient_checkpointing=args.gradient_checkpointing,
        bf16=cuda,
        use_cpu=not cuda,
        save_strategy="no",
        report_to="none",
        logging_steps=10**6,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    if variant == "idft":
        trainer_cls, config = IDFTTrainer, IDFTConfig(token_loss="idft", **common)
    elif variant == "sft":
        trainer_cls, config = SFTTrainer, SFTConfig(**common)
    else:
        trainer_cls, config = _reference_trainer_class(), SFTConfig(**common)
    return trainer_cls(model=model, args=config, train_dataset=dataset, processing_class=tok, callbacks=list(callbacks))


def step_timer(cuda: bool):
    """A Trainer callback that appends each optimizer step's wall time (CUDA-synchronised) to its ``times`` list."""
    import torch
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []

        def on_step_begin(self, *a, **k):
            if cuda:
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            if cuda:
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.t0)

    return StepTimer()


def run_worker(args) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import torch

    variant = args._worker
    cuda = torch.cuda.is_available()
    timer = step_timer(cuda)
    times = timer.times

    trainer = make_trainer(variant, args, [timer])
    model = trainer.model
    vocab = model.config.get_text_config().vocab_size
    rss_before_kib = _current_rss_kib()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base_alloc = torch.cuda.memory_allocated()
    trainer.train()
    result = {
        "variant": variant,
        "step_times_s": times[args.warmup :],
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_before_train_mib": rss_before_kib / 1024,
        "threads": torch.get_num_threads(),
        "vocab_size": vocab,
        "num_parameters": sum(p.numel() for p in model.parameters()),
    }
    result["train_growth_mib"] = result["peak_rss_mib"] - result["rss_before_train_mib"]
    if cuda:
        result["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        result["cuda_train_growth_mib"] = (torch.cuda.max_memory_allocated() - base_alloc) / 2**20
        result["device"] = torch.cuda.get_device_name()
    with open(args._result, "w") as f:
        json.dump(result, f)


def _current_rss_kib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return float(line.split()[1])
    return float("nan")


# ------------------------------------------------------------------------------------------------------------ driver


def run_loss_only(num_tokens: int, calls: int = 200) -> dict:
    """Median time of the loss math plus its backward on per-token vectors: what IDFT adds to SFT's step."""
    import torch

    from trl_onpolicy.losses import token_loss

    torch.manual_seed(0)

    def once(kind: str) -> float:
        log_p = (-5 * torch.rand(num_tokens)).requires_grad_()
        entropy, mask = 3 * torch.rand(num_tokens), torch.ones(num_tokens)
        t0 = time.perf_counter()
        per_token = -log_p if kind == "nll" else token_loss("idft", log_p, entropy)[0]
        ((per_token * mask).sum() / mask.sum()).backward()
        return time.perf_counter() - t0

    result = {}
    for kind in ("nll", "idft"):
        for _ in range(20):
            once(kind)
        result[kind] = statistics.median(once(kind) for _ in range(calls))
    print(
        f"token-loss math + backward on {num_tokens} tokens, median of {calls} calls: nll {result['nll'] * 1e3:.3f} ms, "
        f"idft {result['idft'] * 1e3:.3f} ms (IDFT adds {(result['idft'] - result['nll']) * 1e3:.3f} ms per step)"
    )
    return result


def run_inprocess(args) -> dict:
    """Step-interleaved timing in one process: each round runs one optimizer step of every variant, in rotating order,
    on the same batch; returns {variant: [step seconds]}."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from tqdm.auto import tqdm

    cuda = torch.cuda.is_available()
    trainers = {v: make_trainer(v, args) for v in args.variants}
    batch = None
    for trainer in trainers.values():
        trainer.create_optimizer_and_scheduler(num_training_steps=args.warmup + args.steps)
        trainer.model.train()
        if args.gradient_checkpointing:
            trainer.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if batch is None:  # every variant trains on this same batch
            batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    num_items = (batch["labels"][:, 1:] != -100).sum()

    def one_step(trainer) -> float:
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        trainer.training_step(trainer.model, dict(batch), num_items)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    times = {v: [] for v in args.variants}
    rounds = args.warmup + args.steps * args.repeats
    for r in tqdm(range(rounds), desc="interleaved rounds"):
        k = r % len(args.variants)
        for v in args.variants[k:] + args.variants[:k]:
            elapsed = one_step(trainers[v])
            if r >= args.warmup:
                times[v].append(elapsed)
    return times


def main(argv=None) -> int:
    args = parse_args(argv)
    if args._worker:
        run_worker(args)
        return 0
    forwarded = [a for a in (argv if argv is not None else sys.argv[1:]) if not a.startswith("--_")]
    if args.loss_only:
        run_loss_only(args.seq_len)
        return 0
    if args.inprocess:
        t_all = time.time()
        times = run_inprocess(args)
        base = statistics.median(times["sft"])
        print(
            f"\nin-process step-interleaved timing: vocab {args.vocab_size}, seq {args.seq_len}, batch {args.batch_size}, "
            f"{args.num_layers} layers, gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}; "
            f"{args.warmup} warm-up round(s), {len(times['sft'])} timed steps per variant\n"
        )
        print("| variant | step time, median (s) | x SFT | per-round ratio vs SFT, median |")
        print("|---|---|---|---|")
        summary = {}
        for v, ts in times.items():
            paired = statistics.median(t / b for t, b in zip(ts, times["sft"]))
            summary[v] = {"step_times_s": ts, "step_time_median_s": statistics.median(ts), "paired_ratio_median": paired}
            print(f"| {v} | {statistics.median(ts):.2f} | {statistics.median(ts) / base:.3f} | {paired:.3f} |")
        print("\n(all step times in s: " + "; ".join(f"{v}: {[round(t, 2) for t in ts]}" for v, ts in times.items()) + ")")
        print(f"total benchmark wall time {time.time() - t_all:.0f} s")
        if args.output_json:
            with open(args.output_json, "w") as f:
                json.dump({"command": " ".join([os.path.basename(__file__), *forwarded]), "summary": summary}, f, indent=2)
        return 0
    runs: dict[str, list[dict]] = {v: [] for v in args.variants}
    from tqdm.auto import tqdm

    schedule = []
    for r in range(args.repeats):
        k = r % len(args.variants)
        schedule += args.variants[k:] + args.variants[:k]  # rotate the order each round
    t_all = time.time()
    for variant in tqdm(schedule, desc="benchmark runs"):
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            out = f.name
        cmd = [sys.executable, os.path.abspath(__file__), *forwarded, "--_worker", variant, "--_result", out]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stdout[-3000:], proc.stderr[-6000:], file=sys.stderr)
            raise SystemExit(f"benchmark worker {variant!r} failed (exit {proc.returncode})")
        with open(out) as f:
            runs[variant].append(json.load(f))
        os.unlink(out)

    gpu = "cuda_peak_mib" in runs["sft"][0]
    mem_key, growth_key = ("cuda_peak_mib", "cuda_train_growth_mib") if gpu else ("peak_rss_mib", "train_growth_mib")
    summary = {}
    for v, rs in runs.items():
        steps = [t for r in rs for t in r["step_times_s"]]
        summary[v] = {
            "step_time_median_s": statistics.median(steps),
            "step_times_s": steps,
            "peak_mib_median": statistics.median(r[mem_key] for r in rs),
            "train_growth_mib_median": statistics.median(r[growth_key] for r in rs),
        }
    base = summary["sft"]
    for v, s in summary.items():
        s["time_ratio_vs_sft"] = s["step_time_median_s"] / base["step_time_median_s"]
        s["peak_ratio_vs_sft"] = s["peak_mib_median"] / base["peak_mib_median"]
        s["growth_ratio_vs_sft"] = s["train_growth_mib_median"] / base["train_growth_mib_median"]

    first = runs["sft"][0]
    setting = (
        f"{'model ' + args.model if args.model else args.arch + ' random model'}: {first['num_parameters'] / 1e6:.1f}M "
        f"params, vocab {first['vocab_size']}, seq {args.seq_len}, batch {args.batch_size}, gradient checkpointing "
        f"{'on' if args.gradient_checkpointing else 'off'}, {'bf16 on ' + first.get('device', 'cuda') if gpu else 'fp32 on CPU'} "
        f"({first['threads']} torch threads); {args.repeats} interleaved runs x {args.steps} timed steps per variant "
        f"after {args.warmup} warm-up step(s)"
    )
    mem_name = "CUDA max allocated" if gpu else "peak RSS"
    print(f"\n{setting}\n")
    print(f"| variant | step time, median (s) | x SFT | {mem_name} (MiB) | x SFT | growth during training (MiB) | x SFT |")
    print("|---|---|---|---|---|---|---|")
    for v, s in summary.items():
        print(
            f"| {v} | {s['step_time_median_s']:.2f} | {s['time_ratio_vs_sft']:.3f} | {s['peak_mib_median']:.0f} | "
            f"{s['peak_ratio_vs_sft']:.3f} | {s['train_growth_mib_median']:.0f} | {s['growth_ratio_vs_sft']:.3f} |"
        )
    print(f"\n(all step times in s: " + "; ".join(f"{v}: {[round(t, 2) for t in s['step_times_s']]}" for v, s in summary.items()) + ")")
    print(f"total benchmark wall time {time.time() - t_all:.0f} s")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"setting": setting, "command": " ".join([os.path.basename(__file__), *forwarded]), "summary": summary, "runs": runs}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
