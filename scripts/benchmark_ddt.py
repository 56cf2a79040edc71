"""Benchmark DDT scoring against a plain forward pass over the same tokens, in one invocation.

For each vocabulary size, one model of SmolLM2-135M's shape (or the real embedded model with ``--real``) is built and
two workloads run on the same batch of token ids:

- ``forward``: ``model(input_ids, attention_mask).logits`` (transformers materialises ``[B, T, V]`` logits);
- ``ddt``: `trl_onpolicy.ddt.scoring.score_token_ids` scoring every token (transformer body, then log p, entropy and
  varentropy in vocabulary tiles, never ``[B, T, V]``).

Timing alternates the two (forward, ddt, forward, ddt, ...) so that a shared, noisy CPU affects both alike; the
figure is the median over repetitions. Peak memory is the growth of the process's peak resident set (Linux VmHWM,
reset before each workload via /proc/self/clear_refs; see `set_mmap_threshold`) on CPU,
``torch.cuda.max_memory_allocated`` on GPU, above what was resident before the workload (model and inputs).
Results: docs/benchmarks_ddt.md.

    python scripts/benchmark_ddt.py                       # vocab 49152 and 151936, 2 x 512 tokens
    python scripts/benchmark_ddt.py --real --vocab_sizes 49152 --batch 4 --seq 256
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import time

import torch


def peak_tracker(device: torch.device):
    """(reset, read_mb): reset the peak-memory high-water mark; read the peak (MB) since the reset."""
    if device.type == "cuda":
        def reset():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            reset.base = torch.cuda.memory_allocated()

        def read():
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - reset.base) / 2**20

        return reset, read

    def status(key):
        return int(re.search(rf"{key}:\s+(\d+)", open("/proc/self/status").read()).group(1))

    def reset():
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        reset.base = status("VmRSS")

    def read():
        return (status("VmHWM") - reset.base) / 1024

    return reset, read


def set_mmap_threshold(nbytes: int) -> None:
    """glibc's malloc keeps freed blocks resident and reuses them, which hides a later workload's peak from VmHWM.
    For the memory measurement every allocation of 64 KiB or more is served by mmap (freed memory leaves the
    resident set at once); for timing the threshold goes back to 32 MiB, glibc's usual steady state, so that tiles
    reuse heap memory instead of paying page faults on every allocation."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, nbytes)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def build_model(vocab: int, layers: int, real: bool, device, dtype):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if real:
        from trl_onpolicy.utils.models import smollm2_path

        model = AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=dtype)
        if vocab != model.config.vocab_size:
            raise SystemExit(f"--real uses SmolLM2's vocabulary ({model.config.vocab_size}); got --vocab_sizes {vocab}")
    else:  # SmolLM2-135M's shape with a chosen vocabulary
        config = LlamaConfig(
            vocab_size=vocab, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers, num_attention_heads=9,
            num_key_value_heads=3, max_position_embeddings=8192, tie_word_embeddings=True, rope_theta=100000.0,
        )
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).to(dtype)
    return model.to(device).eval()


def run(args) -> list[dict]:
    from trl_onpolicy.ddt.scoring import score_token_ids
    from trl_onpolicy.ops.lm_head import default_tiles

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype)
    reset, read = peak_tracker(device)
    args.token_chunk, args.vocab_chunk = default_tiles(device, args.token_chunk, args.vocab_chunk)
    print(f"# tiles: token_chunk={args.token_chunk}, vocab_chunk={args.vocab_chunk}")
    rows = []
    for vocab in args.vocab_sizes:
        model = build_model(vocab, args.layers, args.real, device, dtype)
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, min(vocab, 49152), (args.batch, args.seq), generator=gen)
        attn = torch.ones_like(ids)
        seqs, masks = ids.tolist(), [[1] * args.seq for _ in range(args.batch)]
        ids, attn = ids.to(device), attn.to(device)
        n_tokens = args.batch * (args.seq - 1)  # scored positions (each forward position predicts one token)

        @torch.no_grad()
        def forward():
            out = model(input_ids=ids, attention_mask=attn).logits
            if device.type == "cuda":
                torch.cuda.synchronize()
            return out.shape

        def ddt():
            out = score_token_ids(model, seqs, masks, batch_size=args.batch, vocab_chunk=args.vocab_chunk,
                                  token_chunk=args.token_chunk)
            if device.type == "cuda":
                torch.cuda.synchronize()
            return len(out)

        forward(), ddt()  # warm-up (also pages in memory-mapped weights, which would otherwise count as peak)
        memory = {}
        set_mmap_threshold(1 << 16)
        for name, fn in (("forward", forward), ("ddt", ddt)):
            reset()
            fn()
            memory[name] = read()
        set_mmap_threshold(32 << 20)
        times = {"forward": [], "ddt": []}
        for _ in range(args.repeats):
            for name, fn in (("forward", forward), ("ddt", ddt)):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        row = {
            "vocab": vocab,
            "tokens": n_tokens,
            "forward_tok_s": n_tokens / med["forward"],
            "ddt_tok_s": n_tokens / med["ddt"],
            "throughput_ratio": med["forward"] / med["ddt"],
            "forward_peak_mb": memory["forward"],
            "ddt_peak_mb": memory["ddt"],
            "logits_mb": args.batch * args.seq * vocab * 4 / 2**20,
            "tile_mb": min(args.token_chunk, n_tokens) * min(args.vocab_chunk, vocab) * 4 / 2**20,
            "forward_s": times["forward"],
            "ddt_s": times["ddt"],
        }
        rows.append(row)
        print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items() if not k.endswith("_s")}), flush=True)
        del model
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab_sizes", type=int, nargs="+", default=[49152, 151936])
    p.add_argument("--layers", type=int, default=30, help="transformer layers of the synthetic model (SmolLM2: 30)")
    p.add_argument("--real", action="store_true", help="use the embedded SmolLM2-135M-Instruct weights (vocab 49152)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--vocab_chunk", type=int, default=None, help="default: trl_onpolicy.ops.lm_head.DEFAULT_TILES")
    p.add_argument("--token_chunk", type=int, default=None, help="default: trl_onpolicy.ops.lm_head.DEFAULT_TILES")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}, device {args.device or ('cuda' if torch.cuda.is_available() else 'cpu')}")
    rows = run(args)
    print("\n| vocab | tokens | forward tok/s | DDT tok/s | DDT / forward | forward peak MB | DDT peak MB | [B,T,V] fp32 logits MB | one tile MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['vocab']} | {r['tokens']} | {r['forward_tok_s']:.0f} | {r['ddt_tok_s']:.0f} | {r['throughput_ratio']:.2f}x | "
              f"{r['forward_peak_mb']:.0f} | {r['ddt_peak_mb']:.0f} | {r['logits_mb']:.0f} | {r['tile_mb']:.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
