"""Throughput of `trl_onpolicy.hinted_decode` against two baselines, measured in one process.

    python scripts/benchmark_hinted.py [--batch-size 16] [--new-tokens 256] [--model smollm2|random-llama]

- ``hinted``:  `hinted_decode` (batched, KV cache, hinted + plain rows in one forward per step), sampling with
  temperature 0.3 / top-p 0.95, beta 3, linear lambda, a splitter that never matches (its decode check still runs),
  the repetition check running but never firing;
- ``generate``: `model.generate` on the same hinted prompts, same batch size and length, sampling, KV cache
  (baseline (a): what plain sampling of one stream costs);
- ``authors``: the authors' algorithm (baseline (b)): one sample at a time, no KV cache, the full hinted and plain
  prefixes recomputed at every token. It is quadratic in the length, so it is NOT run for every token: one step
  is timed at ``--ref-spots`` evenly spaced positions t of the real (hinted_decode-generated) prefixes of
  ``--ref-samples`` samples, and the cost of all ``--new-tokens`` steps is the trapezoid integral of those
  per-step times over t. To check the estimate, the true loop also runs for its first ``--ref-loop-tokens`` tokens
  on one sample, and the estimate for that stretch is printed next to the measured time. The baseline is given
  the benefit of ``logits_to_keep=1`` (last-position logits only).

Every run is forced to the full length (EOS masked), so tokens/s compare equal work. Prints a Markdown table and
writes JSON with ``--output``.

Length sweep (``--sweep``): `hinted_decode` against `model.generate` only, at every length of ``--lengths``
(default 256 1024 4096) with the tiny offline model (hidden 64, 2 layers: the forward is cheap, so the decoding
loop's own host work shows, as it does on a GPU) and at ``--smollm2-lengths`` (default 256) with the embedded
SmolLM2-135M-Instruct, batch 16, sampling, no EOS. ``--rounds`` A/B rounds are interleaved (the order alternates)
and the median times give the ratio at each length; the flatness figure is ratio(longest) / ratio(shortest)::

    OMP_NUM_THREADS=1 python scripts/benchmark_hinted.py --sweep --threads 1 --rounds 3 --output sweep.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

from trl_onpolicy.hinted.decoding import hinted_decode, hinted_entropy, mix_log_probs, mixing_lambda, select_tokens

QUESTIONS = [
    ("Tom has {a} apples and buys {b} more bags with {c} apples each. How many apples does he have now?",
     "Each bag holds {c} apples, so {b} bags hold {b} * {c} = {bc} apples. Together with the {a} he had: "
     "{a} + {bc} = {t}. The answer is \\boxed{{{t}}}."),
    ("A train travels {a} miles per hour for {b} hours and then {c} more miles. How far does it go in total?",
     "In {b} hours at {a} miles per hour it covers {a} * {b} = {ab} miles. Adding the extra {c} miles gives "
     "{ab} + {c} = {t2} miles. The answer is \\boxed{{{t2}}}."),
    ("Sara reads {a} pages a day for {b} days, then {c} pages on the last day. How many pages did she read?",
     "Over {b} days she reads {a} * {b} = {ab} pages. On the last day she reads {c} more, so the total is "
     "{ab} + {c} = {t2}. The answer is \\boxed{{{t2}}}."),
]
HINT_TEMPLATE = (
    "Here is a problem and a reference solution.\n\nProblem: {q}\n\nReference solution: {s}\n\n"
    "Solve the problem step by step in your own words, as if you were solving it for the first time. "
    "Do not mention that you were given a reference solution. Put the final answer in \\boxed{{}}."
)


def make_prompts(tokenizer, n: int, seed: int = 0):
    import random

    rng = random.Random(seed)
    hinted, plain = [], []
    for i in range(n):
        a, b, c = rng.randint(2, 40), rng.randint(2, 12), rng.randint(2, 60)
        q_t, s_t = QUESTIONS[i % len(QUESTIONS)]
        vals = dict(a=a, b=b, c=c, bc=b * c, t=a + b * c, ab=a * b, t2=a * b + c)
        q, s = q_t.format(**vals), s_t.format(**vals)
        # vary the length of the prompts so left padding is exercised
        q = q + " Please explain." * (i % 4)
        h_msgs = [{"role": "user", "content": HINT_TEMPLATE.format(q=q, s=s)}]
        p_msgs = [{"role": "user", "content": q}]
        hinted.append(list(tokenizer.apply_chat_template(h_msgs, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]))
        plain.append(list(tokenizer.apply_chat_template(p_msgs, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]))
    return hinted, plain


def load_model(name: str, dtype: torch.dtype, device: str):
    if name == "tiny":
        from trl_onpolicy.testing.tiny import make_tiny_model

        model, tok = make_tiny_model(seed=0)
        model.config.max_position_embeddings = 16384
        model = model.to(dtype)
    elif name == "smollm2":
        from trl_onpolicy.utils.models import load_smollm2

        model, tok = load_smollm2(dtype=dtype)
    elif name == "random-llama":
        # SmolLM2-135M's shape with random weights (no download needed); uses the tiny offline tokenizer
        from transformers import LlamaConfig, LlamaForCausalLM

        from trl_onpolicy.testing.tiny import make_tiny_tokenizer

        tok = make_tiny_tokenizer()
        config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                             num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                             max_position_embeddings=8192, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id, bos_token_id=None)
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).to(dtype)
    elif os.path.isdir(name):  # a converted Hugging Face folder (e.g. SmolLM2 carried to a GPU machine)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model, tok = AutoModelForCausalLM.from_pretrained(name, dtype=dtype), AutoTokenizer.from_pretrained(name)
    else:
        raise ValueError(f"--model must be tiny, smollm2, random-llama or a model folder, got {name!r}")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model.to(device).eval(), tok


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device):
    """Run ``fn``; return its output and the elapsed time in seconds: wall-clock on a GPU, this process's CPU time
    on a CPU (on a shared machine, CPU time is what the work cost; wall time also counts the other tenants)."""
    sync(device)
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    sync(device)
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    WALL.append(wall)
    return out, (wall if str(device).startswith("cuda") else cpu)


WALL: list[float] = []  # wall-clock seconds of every timed call, for the record


def run_generate(model, tok, prompts, new_tokens, args, device):
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):] = torch.tensor(p)
        mask[r, width - len(p):] = 1
    torch.manual_seed(args.seed)
    out = model.generate(ids.to(device), attention_mask=mask.to(device), do_sample=True, temperature=args.temperature,
                         top_p=args.top_p, top_k=None, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         pad_token_id=tok.pad_token_id)
    return out[:, width:]


def run_hinted(model, tok, hinted, plain, new_tokens, args):
    return hinted_decode(model, tok, hinted, plain, beta=args.beta, temperature=args.temperature, top_p=args.top_p,
                         max_new_tokens=new_tokens, eos_token_ids=[], splitter="<<no such splitter>>",
                         repetition_window=30, repetition_count=10**9, seed=args.seed)


def authors_step(model, hinted_prefix, plain_prefix, args, generator, device):
    """One token of the authors' loop: two full forwards (no cache), the mixture, top-p then temperature."""
    zp = model(torch.tensor([hinted_prefix], device=device), use_cache=False, logits_to_keep=1).logits[0, -1]
    zq = model(torch.tensor([plain_prefix], device=device), use_cache=False, logits_to_keep=1).logits[0, -1]
    log_p, log_q = zp.float().log_softmax(-1), zq.float().log_softmax(-1)
    lam = mixing_lambda(hinted_entropy(log_p), "linear", beta=args.beta)
    log_m = mix_log_probs(log_p, log_q, lam)
    return int(select_tokens(log_m[None], temperature=args.temperature, top_p=args.top_p, generators=generator)[0])


def interleaved(model, tok, hinted, plain, n_new, args, device, rounds):
    """Time `generate` and `hinted_decode` in alternating order (A B, B A, ...) so drift hits both alike; yields
    ``(round, "generate" | "hinted", seconds, output)`` after checking each ran the full ``n_new`` tokens."""
    b = len(hinted)
    for rnd in range(rounds):
        for which in (["generate", "hinted"] if rnd % 2 == 0 else ["hinted", "generate"]):
            if which == "generate":
                out, dt = timed(lambda: run_generate(model, tok, hinted, n_new, args, device), device)
                assert out.shape == (b, n_new), out.shape
            else:
                out, dt = timed(lambda: run_hinted(model, tok, hinted, plain, n_new, args), device)
                assert all(len(r.token_ids) == n_new and r.finish_reason == "length" for r in out)
            yield rnd, which, dt, out


def sweep_model(name, lengths, args, device, dtype, rounds=None, label=None):
    """Interleaved A/B rounds of generate and hinted_decode at every length; one row per length. ``name``: see
    `load_model`; ``rounds``: default ``args.rounds``; ``label``: the model's name in the rows (default ``name``)."""
    rounds = rounds or args.rounds
    model, tok = load_model(name, dtype, device)
    name = label or name
    hinted, plain = make_prompts(tok, args.batch_size, args.seed)
    b = args.batch_size
    run_hinted(model, tok, hinted[:2], plain[:2], 4, args)  # warm-up
    run_generate(model, tok, hinted[:2], 4, args, device)
    rows = []
    for n_new in lengths:
        t_gen, t_hint = [], []
        for rnd, which, dt, _ in interleaved(model, tok, hinted, plain, n_new, args, device, rounds):
            (t_gen if which == "generate" else t_hint).append(dt)
            print(f"  {name} {n_new:>5} tokens round {rnd}: {which} {dt:.2f} s ({b * n_new / dt:.0f} tok/s)",
                  flush=True)
        med_gen, med_hint = statistics.median(t_gen), statistics.median(t_hint)
        rows.append(dict(model=name, new_tokens=n_new, batch_size=b, rounds=rounds,
                         seconds_generate=t_gen, seconds_hinted=t_hint,
                         median_seconds_generate=med_gen, median_seconds_hinted=med_hint,
                         tokens_per_s_generate=b * n_new / med_gen, tokens_per_s_hinted=b * n_new / med_hint,
                         ratio=med_gen / med_hint,
                         round_ratios=[g / h for g, h in zip(t_gen, t_hint)]))
    return rows


@torch.no_grad()
def sweep(args, argv):
    device, dtype = args.device, getattr(torch, args.dtype)
    rows = []
    if args.lengths:
        rows += sweep_model("tiny", args.lengths, args, device, dtype)
    if args.smollm2_lengths:
        rows += sweep_model("smollm2", args.smollm2_lengths, args, device, dtype, rounds=args.smollm2_rounds)
    summary = {}
    for name in ("tiny", "smollm2"):
        mine = [r for r in rows if r["model"] == name]
        if len(mine) > 1:
            summary[f"{name}_flatness"] = mine[-1]["ratio"] / mine[0]["ratio"]
    report = dict(
        command="python scripts/benchmark_hinted.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        machine=f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores, "
                f"{torch.get_num_threads()} torch threads; {device}",
        load_average=os.getloadavg(), torch=torch.__version__, dtype=args.dtype,
        clock="wall" if str(device).startswith("cuda") else "process CPU time",
        rows=rows, **summary,
    )
    print()
    print("| model | new tokens | generate tok/s | hinted_decode tok/s | ratio (median of rounds) | per-round ratios |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['new_tokens']} | {r['tokens_per_s_generate']:.1f} | {r['tokens_per_s_hinted']:.1f} | "
              f"**{r['ratio']:.2f}x** | {', '.join(f'{x:.2f}' for x in r['round_ratios'])} |")
    for key, value in summary.items():
        print(f"{key} = ratio at the longest / ratio at the shortest length = {value:.2f} (target >= 0.8)")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(report, f, indent=2)
    return report


@torch.no_grad()
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="smollm2 | random-llama | tiny | a model folder")
    ap.add_argument("--sweep", action="store_true", help="length sweep against generate only (see above)")
    ap.add_argument("--lengths", type=int, nargs="*", default=[256, 1024, 4096],
                    help="--sweep: new-token lengths for the tiny model (none: skip it)")
    ap.add_argument("--smollm2-lengths", type=int, nargs="*", default=[256],
                    help="--sweep: new-token lengths for SmolLM2 (none: skip it; ~8 tok/s at batch 8 on 2 CPU cores)")
    ap.add_argument("--rounds", type=int, default=3, help="--sweep: interleaved A/B rounds per length (median kept)")
    ap.add_argument("--smollm2-rounds", type=int, default=None, help="--sweep: rounds for SmolLM2 (default --rounds)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--beta", type=float, default=3.0)
    ap.add_argument("--temperature", type=float, default=0.3)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--ref-samples", type=int, default=2, help="samples whose authors'-loop cost is spot-timed")
    ap.add_argument("--ref-spots", type=int, default=5, help="positions t timed per sample (evenly spaced)")
    ap.add_argument("--ref-loop-tokens", type=int, default=8, help="tokens of the true authors' loop, as a check")
    ap.add_argument("--ref-reps", type=int, default=1, help="timings per spot (the fastest is kept)")
    ap.add_argument("--repeats", type=int, default=1, help="timed runs of hinted/generate (interleaved; best kept)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.sweep:
        return sweep(args, argv)
    device = args.device
    dtype = getattr(torch, args.dtype)
    model, tok = load_model(args.model, dtype, device)
    hinted, plain = make_prompts(tok, args.batch_size, args.seed)
    b, n_new = args.batch_size, args.new_tokens
    print(f"model={args.model} device={device} dtype={args.dtype} threads={torch.get_num_threads()} batch={b} "
          f"new_tokens={n_new} hinted prompt lengths {min(map(len, hinted))}-{max(map(len, hinted))}, "
          f"plain {min(map(len, plain))}-{max(map(len, plain))}", flush=True)

    # warm-up (allocator, kernels) on a short run
    run_hinted(model, tok, hinted[:2], plain[:2], 4, args)
    run_generate(model, tok, hinted[:2], 4, args, device)

    t_gen, t_hint, results = [], [], None
    for _, which, dt, out in interleaved(model, tok, hinted, plain, n_new, args, device, args.repeats):
        if which == "generate":
            t_gen.append(dt)
            w_gen = WALL[-1]
        else:
            results = out
            t_hint.append(dt)
            w_hint = WALL[-1]
        print(f"  {which}: {dt:.1f} s timed ({b * n_new / dt:.1f} tok/s), {WALL[-1]:.1f} s wall", flush=True)

    # baseline (b): spot-time the authors' per-token step at evenly spaced positions of the real prefixes
    gen = torch.Generator(device=device).manual_seed(args.seed)
    spots = sorted({round(k * (n_new - 1) / max(args.ref_spots - 1, 1)) for k in range(args.ref_spots)})
    per_sample_total, spot_table = [], []
    for s in range(min(args.ref_samples, b)):
        out = results[s].token_ids
        times = []
        for t in spots:
            reps = []
            for _ in range(args.ref_reps):
                _, dt = timed(lambda: authors_step(model, hinted[s] + out[:t], plain[s] + out[:t], args, gen, device), device)
                reps.append(dt)
            times.append(min(reps))
        spot_table.append(dict(sample=s, positions=spots, seconds=times))
        # trapezoid over t = 0 .. n_new-1 with the step cost linearly interpolated between spots
        total = sum((times[k] + times[k + 1]) / 2 * (spots[k + 1] - spots[k]) for k in range(len(spots) - 1))
        total += (times[0] + times[-1]) / 2  # the two end tokens themselves
        per_sample_total.append(total)
        print(f"  authors' loop, sample {s}: step time {['%.3f' % x for x in times]} s at t={spots}; "
              f"estimated {total:.1f} s for {n_new} tokens", flush=True)
    # check the estimate against the true loop on its first tokens
    s, k = 0, min(args.ref_loop_tokens, n_new)
    prefix_h, prefix_p = list(hinted[s]), list(plain[s])

    def true_loop():
        gen_tokens = []
        for _ in range(k):
            tok_id = authors_step(model, prefix_h + gen_tokens, prefix_p + gen_tokens, args, gen, device)
            gen_tokens.append(tok_id)
        return gen_tokens

    _, loop_time = timed(true_loop, device)
    times0 = spot_table[0]["seconds"]
    est_first_k = sum(times0[0] + (times0[1] - times0[0]) * t / spots[1] for t in range(k)) if len(spots) > 1 else times0[0] * k
    print(f"  authors' loop, true run of {k} tokens on sample 0: {loop_time:.2f} s (spot-interpolated estimate "
          f"{est_first_k:.2f} s)", flush=True)

    best_gen, best_hint = min(t_gen), min(t_hint)
    authors_time = statistics.mean(per_sample_total) * b  # one sample after another
    tps = {
        "hinted_decode": b * n_new / best_hint,
        "generate": b * n_new / best_gen,
        "authors_estimated": b * n_new / authors_time,
    }
    report = dict(
        command="python scripts/benchmark_hinted.py " + " ".join(argv if argv is not None else __import__("sys").argv[1:]),
        machine=f"{platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} threads; {device}",
        torch=torch.__version__, model=args.model, dtype=args.dtype, batch_size=b, new_tokens=n_new,
        clock="wall" if str(device).startswith("cuda") else "process CPU time",
        wall_seconds_last=dict(hinted_decode=w_hint, generate=w_gen),
        seconds=dict(hinted_decode=t_hint, generate=t_gen, authors_estimated=authors_time,
                     authors_true_loop_first_tokens=loop_time, authors_spot_estimate_first_tokens=est_first_k),
        tokens_per_s=tps,
        speedup_vs_authors=tps["hinted_decode"] / tps["authors_estimated"],
        ratio_vs_generate=tps["hinted_decode"] / tps["generate"],
        authors_spots=spot_table,
        mean_lambda=statistics.mean(r.lambda_mean for r in results),
    )
    print()
    print("| method | tokens/s | relative to hinted_decode |")
    print("|---|---|---|")
    for name, v in tps.items():
        print(f"| {name} | {v:.2f} | {v / tps['hinted_decode']:.3f} |")
    print(f"\nhinted_decode / generate = {report['ratio_vs_generate']:.2f}x (target >= 0.5 on CPU); "
          f"hinted_decode / authors = {report['speedup_vs_authors']:.1f}x (target >= 20); "
          f"mean lambda {report['mean_lambda']:.3f}")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
