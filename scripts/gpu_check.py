#!/usr/bin/env python
"""The project's GPU check: one command, one CUDA GPU, under 8 minutes, one JSON + Markdown summary.

Sections (each reuses its benchmark script; a failing section is recorded and the others still run):

1. ``loss``: `scripts/benchmark_loss.py`'s ``--gpu`` preset (vocabulary 151,936, sequence 4,096, gradient
   checkpointing, bf16; one subprocess per run, so CUDA peak memory is clean): IDFT vs SFT step time and peak memory,
   and the authors'-style full-softmax ``reference``.
2. ``ddt``: `scripts/benchmark_ddt.py`: DDT scoring vs a plain forward (SmolLM2 shape, vocab 49,152 and 151,936).
3. ``hinted``: `scripts/benchmark_hinted.py`'s length sweep: Hinted Decoding vs ``model.generate`` on SmolLM2,
   batch 64, 256 and 1,024 new tokens, sampling, no EOS.
4. ``train``: 30 bf16 optimizer steps of SmolLM2 with `IDFTTrainer(token_loss="dft")` (IDFT at gamma = 1) and with
   TRL's `SFTTrainer(loss_type="dft")` on the same data and seed: the per-step losses must match; then 30 steps of
   IDFT proper (``token_loss="idft"``) for its loss curve and step time.

SmolLM2's weights come from a converted Hugging Face folder (``--model``; default: the project's cache folder,
``$TRL_ONPOLICY_CACHE/SmolLM2-135M-Instruct`` or ``~/.cache/trl_onpolicy/SmolLM2-135M-Instruct``): the GPU machine has
no ``gguf`` package, so nothing is converted there. Without such a folder the check uses a randomly initialised model
of SmolLM2's shape and says so in the summary. Nothing is installed or downloaded here; see docs/benchmarks.md
("GPU check") for carrying trl, datasets and the project as wheels.

    python scripts/gpu_check.py --out gpu_check_out                 # on the GPU (about 6-8 minutes)
    python scripts/gpu_check.py --cpu-smoke --out /tmp/smoke        # tiny sizes on CPU, end to end (< 3 minutes)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for path in (str(HERE), str(ROOT)):
    if path not in sys.path:
        sys.path.insert(0, path)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
# the loss benchmark's workers are subprocesses: let them import the project from this checkout too
os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])

import torch  # noqa: E402

SECTIONS = ("loss", "ddt", "hinted", "train")
TRAIN_STEPS = 30


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT") or "gpu_check_out", help="folder for gpu_check.json/.md")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on CPU: checks that every section runs")
    p.add_argument("--model", default=None, help="converted SmolLM2 folder (default: the project's cache folder)")
    p.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset of " + ",".join(SECTIONS))
    p.add_argument("--hinted-rounds", type=int, default=1, help="interleaved generate/hinted rounds per length")
    p.add_argument("--train-steps", type=int, default=TRAIN_STEPS)
    p.add_argument("--budget-s", type=float, default=480.0, help="the time the whole check should fit in")
    args = p.parse_args(argv)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        p.error(f"--sections: unknown {sorted(unknown)}; choose from {SECTIONS}")
    if not args.cpu_smoke and not torch.cuda.is_available():
        p.error("no CUDA GPU is visible: run on a GPU machine, or pass --cpu-smoke for the tiny CPU run")
    return args


def smollm2_folder(explicit: str | None) -> tuple[str | None, str]:
    """(folder or None, how it was found). Never converts: the GPU machine has no gguf package."""
    if explicit:
        folder = Path(explicit).expanduser()
        if not (folder / "config.json").is_file():
            raise SystemExit(f"--model={explicit} is invalid: expected a Hugging Face model folder with config.json")
        return str(folder), f"--model {folder}"
    from trl_onpolicy.utils.models import cache_root

    folder = cache_root() / "SmolLM2-135M-Instruct"
    if (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
        return str(folder), f"cache folder {folder}"
    return None, f"no converted SmolLM2 folder at {folder}: random weights of SmolLM2's shape"


def random_smollm2(tokenizer_vocab: int | None = None):
    """SmolLM2-135M's shape with random weights and the tiny offline tokenizer (when no weights are available)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from trl_onpolicy.testing.tiny import make_tiny_tokenizer

    tok = make_tiny_tokenizer()
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                         max_position_embeddings=8192, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         bos_token_id=None)
    torch.manual_seed(0)
    return LlamaForCausalLM(config), tok


# ------------------------------------------------------------------------------------------------------------ sections


def section_loss(args, out_dir: Path) -> dict:
    import benchmark_loss

    result_file = out_dir / "loss_benchmark.json"
    if args.cpu_smoke:
        argv = ["--vocab_size", "1024", "--hidden_size", "64", "--num_layers", "1", "--seq_len", "128",
                "--repeats", "1", "--steps", "1", "--warmup", "1"]
    else:
        argv = ["--gpu", "--repeats", "1", "--steps", "4", "--warmup", "2"]
    benchmark_loss.main([*argv, "--output_json", str(result_file)])
    data = json.loads(result_file.read_text())
    result_file.unlink()
    summary = data["summary"]
    return dict(
        command="python scripts/benchmark_loss.py " + " ".join(argv),
        setting=data["setting"],
        variants={v: {k: s[k] for k in ("step_time_median_s", "time_ratio_vs_sft", "peak_mib_median",
                                        "peak_ratio_vs_sft", "train_growth_mib_median", "growth_ratio_vs_sft")}
                  for v, s in summary.items()},
        idft_time_vs_sft=summary["idft"]["time_ratio_vs_sft"],
        idft_peak_vs_sft=summary["idft"]["peak_ratio_vs_sft"],
        reference_time_vs_idft=summary["reference"]["step_time_median_s"] / summary["idft"]["step_time_median_s"],
        reference_peak_vs_idft=summary["reference"]["peak_mib_median"] / summary["idft"]["peak_mib_median"],
    )


def section_ddt(args, out_dir: Path) -> dict:
    import benchmark_ddt

    if args.cpu_smoke:
        ns = dict(vocab_sizes=[2048], layers=2, batch=1, seq=64, repeats=1, dtype="float32", device="cpu")
    else:
        ns = dict(vocab_sizes=[49152, 151936], layers=30, batch=8, seq=2048, repeats=3, dtype="bfloat16",
                  device="cuda")
    rows = benchmark_ddt.run(SimpleNamespace(real=False, vocab_chunk=None, token_chunk=None, **ns))
    keep = ("vocab", "tokens", "forward_tok_s", "ddt_tok_s", "throughput_ratio", "forward_peak_mb", "ddt_peak_mb")
    return dict(setting=ns, rows=[{k: r[k] for k in keep} for r in rows])


def section_hinted(args, out_dir: Path, model_folder: str | None) -> dict:
    import benchmark_hinted

    if args.cpu_smoke:
        name, label, lengths, batch, device, dtype = "tiny", "tiny", [16, 32], 4, "cpu", torch.float32
    else:
        name = model_folder or "random-llama"
        label = "smollm2" if model_folder else "random-smollm2-shape"
        lengths, batch, device, dtype = [256, 1024], 64, "cuda", torch.bfloat16
    opts = SimpleNamespace(batch_size=batch, seed=0, beta=3.0, temperature=0.3, top_p=0.95, rounds=args.hinted_rounds)
    rows = benchmark_hinted.sweep_model(name, lengths, opts, device, dtype, label=label)
    if device == "cuda":
        torch.cuda.empty_cache()
    keep = ("model", "new_tokens", "batch_size", "rounds", "tokens_per_s_generate", "tokens_per_s_hinted", "ratio")
    return dict(rows=[{k: r[k] for k in keep} for r in rows], dtype=str(dtype).replace("torch.", ""))


def train_rows(n: int) -> list[dict]:
    """Conversational arithmetic rows with a system prompt and a worked, boxed answer."""
    import random

    rng = random.Random(0)
    rows = []
    for _ in range(n):
        a, b, c = rng.randint(2, 99), rng.randint(2, 99), rng.randint(2, 9)
        rows.append({"messages": [
            {"role": "system", "content": "You are a careful math tutor. Show your steps."},
            {"role": "user", "content": f"What is ({a} + {b}) * {c}?"},
            {"role": "assistant", "content": f"First {a} + {b} = {a + b}. Then {a + b} * {c} = {(a + b) * c}. "
                                             f"The answer is \\boxed{{{(a + b) * c}}}."},
        ]})
    return rows


def section_train(args, out_dir: Path, model_folder: str | None) -> dict:
    import benchmark_loss
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from trl_onpolicy import IDFTConfig, IDFTTrainer

    cuda = not args.cpu_smoke
    steps = args.train_steps
    batch = 8 if cuda else 2

    def build_model():
        if args.cpu_smoke:
            from trl_onpolicy.testing.tiny import make_tiny_model

            return make_tiny_model(seed=0)
        if model_folder:
            return (AutoModelForCausalLM.from_pretrained(model_folder, dtype=torch.float32),
                    AutoTokenizer.from_pretrained(model_folder))
        return random_smollm2()

    def run(trainer_cls, config_cls, **loss_kw):
        model, tok = build_model()
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        config = config_cls(
            output_dir=tempfile.mkdtemp(prefix="gpu-check-train-"), max_steps=steps, per_device_train_batch_size=batch,
            learning_rate=2e-5, logging_steps=1, save_strategy="no", report_to="none", seed=0, disable_tqdm=True,
            dataloader_num_workers=0, max_length=256, bf16=cuda, use_cpu=not cuda, **loss_kw)
        timer = benchmark_loss.step_timer(cuda)
        torch.manual_seed(0)
        trainer = trainer_cls(model=model, args=config, train_dataset=Dataset.from_list(train_rows(steps * batch)),
                              processing_class=tok, callbacks=[timer])
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)  # one printed dict per step would bury the summary
        trainer.train()
        history = [h for h in trainer.state.log_history if "loss" in h and "step" in h]
        del trainer, model
        if cuda:
            torch.cuda.empty_cache()
        return dict(loss=[h["loss"] for h in history], grad_norm=[h.get("grad_norm") for h in history],
                    step_time_median_s=sorted(timer.times)[len(timer.times) // 2] if timer.times else None)

    trl_dft = run(SFTTrainer, SFTConfig, loss_type="dft")
    idft_dft = run(IDFTTrainer, IDFTConfig, token_loss="dft")
    idft = run(IDFTTrainer, IDFTConfig, token_loss="idft")
    n = min(len(trl_dft["loss"]), len(idft_dft["loss"]))
    diffs = [abs(a - b) for a, b in zip(trl_dft["loss"], idft_dft["loss"])]
    rel = [d / max(abs(a), 1e-8) for d, a in zip(diffs, trl_dft["loss"])]
    tolerance = 1e-3  # relative, per step (bf16 autocast; identical math, kernels may differ in rounding)
    return dict(
        steps=steps, batch_size=batch, precision="bf16" if cuda else "fp32 (CPU smoke)",
        weights="smollm2" if (model_folder and not args.cpu_smoke) else ("tiny" if args.cpu_smoke else "random"),
        trl_dft=trl_dft, idft_gamma1=idft_dft, idft=idft,
        steps_compared=n, max_abs_loss_diff=max(diffs) if diffs else None, max_rel_loss_diff=max(rel) if rel else None,
        tolerance_rel=tolerance, match=bool(n == steps and rel and max(rel) <= tolerance),
    )


# ------------------------------------------------------------------------------------------------------------ summary


def environment() -> dict:
    import transformers

    env = dict(python=platform.python_version(), torch=torch.__version__, transformers=transformers.__version__,
               machine=f"{platform.machine()} {os.cpu_count()} CPU cores")
    try:
        import trl

        env["trl"] = trl.__version__
    except ImportError:
        env["trl"] = None
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return env


def markdown(report: dict) -> str:
    lines = [f"# GPU check ({'CPU smoke run, tiny sizes' if report['cpu_smoke'] else 'GPU run'})", "",
             f"- environment: {json.dumps(report['environment'])}",
             f"- SmolLM2 weights: {report['model_source']}",
             f"- total wall time: {report['total_s']:.0f} s (budget {report['budget_s']:.0f} s: "
             f"{'fits' if report['total_s'] <= report['budget_s'] else 'OVER'})", ""]
    s = report["sections"]
    for name in SECTIONS:
        if name not in s:
            continue
        sec = s[name]
        lines.append(f"## {name} ({sec.get('seconds', 0):.0f} s)")
        lines.append("")
        if "error" in sec:
            lines += ["FAILED:", "", "```", sec["error"].strip()[-2000:], "```", ""]
            continue
        if name == "loss":
            lines += [sec["setting"], "", "| variant | step time (s) | x SFT | peak (MiB) | x SFT |", "|---|---|---|---|---|"]
            for v, r in sec["variants"].items():
                lines.append(f"| {v} | {r['step_time_median_s']:.3f} | {r['time_ratio_vs_sft']:.3f} | "
                             f"{r['peak_mib_median']:.0f} | {r['peak_ratio_vs_sft']:.3f} |")
            lines.append(f"\nreference (full softmax) vs IDFT: {sec['reference_time_vs_idft']:.2f}x time, "
                         f"{sec['reference_peak_vs_idft']:.2f}x peak memory")
        elif name == "ddt":
            lines += ["| vocab | tokens | forward tok/s | DDT tok/s | DDT / forward | forward peak MB | DDT peak MB |",
                      "|---|---|---|---|---|---|---|"]
            for r in sec["rows"]:
                lines.append(f"| {r['vocab']} | {r['tokens']} | {r['forward_tok_s']:.0f} | {r['ddt_tok_s']:.0f} | "
                             f"{r['throughput_ratio']:.2f}x | {r['forward_peak_mb']:.0f} | {r['ddt_peak_mb']:.0f} |")
        elif name == "hinted":
            lines += ["| model | batch | new tokens | generate tok/s | hinted tok/s | hinted / generate |",
                      "|---|---|---|---|---|---|"]
            for r in sec["rows"]:
                lines.append(f"| {r['model']} | {r['batch_size']} | {r['new_tokens']} | {r['tokens_per_s_generate']:.0f} | "
                             f"{r['tokens_per_s_hinted']:.0f} | {r['ratio']:.2f}x |")
        elif name == "train":
            lines += [f"{sec['steps']} steps, batch {sec['batch_size']}, {sec['precision']}, weights {sec['weights']}: "
                      f"IDFT(token_loss='dft') vs TRL SFT(loss_type='dft') **{'match' if sec['match'] else 'DIFFER'}** "
                      f"(max relative loss difference {sec['max_rel_loss_diff']:.2e} over {sec['steps_compared']} steps, "
                      f"tolerance {sec['tolerance_rel']:.0e})", "",
                      "| run | first loss | last loss | step time (s) |", "|---|---|---|---|"]
            for key in ("trl_dft", "idft_gamma1", "idft"):
                r = sec[key]
                st = f"{r['step_time_median_s']:.3f}" if r["step_time_median_s"] is not None else "-"
                lines.append(f"| {key} | {r['loss'][0]:.4f} | {r['loss'][-1]:.4f} | {st} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    if args.cpu_smoke:
        torch.set_num_threads(min(2, torch.get_num_threads()))
        model_folder, source = None, "not used (CPU smoke: tiny random models)"
    else:
        model_folder, source = smollm2_folder(args.model)
    report = dict(command="python scripts/gpu_check.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                  cpu_smoke=args.cpu_smoke, environment=environment(), model_source=source, budget_s=args.budget_s,
                  sections={})
    for name in args.sections:
        t0 = time.time()
        print(f"\n===== {name} =====", flush=True)
        try:
            if name == "loss":
                result = section_loss(args, out_dir)
            elif name == "ddt":
                result = section_ddt(args, out_dir)
            elif name == "hinted":
                result = section_hinted(args, out_dir, model_folder)
            else:
                result = section_train(args, out_dir, model_folder)
        except Exception:  # record it and go on: the other sections are still worth having
            result = dict(error=traceback.format_exc())
            print(result["error"], file=sys.stderr, flush=True)
        result["seconds"] = time.time() - t0
        report["sections"][name] = result
        report["total_s"] = time.time() - t_start
        # written after every section, so a run stopped by a time limit still leaves what it measured
        (out_dir / "gpu_check.json").write_text(json.dumps(report, indent=2))
        (out_dir / "gpu_check.md").write_text(markdown(report))
    print("\n" + markdown(report), flush=True)
    failed = [n for n, s in report["sections"].items() if "error" in s]
    mismatch = "train" in report["sections"] and not report["sections"]["train"].get("match", True)
    if failed or mismatch:
        print(f"gpu_check: failed sections {failed}" + (" ; DFT losses differ from TRL's" if mismatch else ""),
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
