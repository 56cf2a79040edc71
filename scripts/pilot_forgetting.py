"""Time the forward-only forgetting metrics (trl_onpolicy.eval.forgetting) on the embedded SmolLM2-135M-Instruct.

Measures, on held-out test-split problems of a task and on the general (facts) prompts: sampling one base response per
prompt at temperature 1 and caching the base hidden states (both once per study), KL(base || trained) on those samples, and the held-out NLL of the
reference solutions. The "trained" model is the base with every weight perturbed by ``--noise`` x its RMS (timing does
not depend on how a model was trained); KL(base || base) is also computed, which must be 0. Results: docs/pilot.md.

    OMP_NUM_THREADS=1 python scripts/pilot_forgetting.py --task chain_sum --n 100
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch


class Clock:
    """Wall and process CPU seconds since the last lap (CPU time is the robust figure on a shared machine)."""

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def lap(self) -> dict:
        wall, cpu = time.perf_counter(), time.process_time()
        out = {"wall_s": round(wall - self.wall, 1), "cpu_s": round(cpu - self.cpu, 1)}
        self.wall, self.cpu = wall, cpu
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="chain_sum")
    parser.add_argument("--task_kwargs", default='{"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 1}')
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--noise", type=float, default=0.01)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from trl_onpolicy.data.datasets import math_word_problems
    from trl_onpolicy.eval.evaluation import FACTS
    from trl_onpolicy.eval.forgetting import base_hidden_states, heldout_nll, kl_to_base, sample_base_responses
    from trl_onpolicy.utils.models import load_model

    base, tok = load_model("embedded:smollm2-135m-instruct", "float32")
    rows = list(math_word_problems(args.n, seed=1, task=args.task, split="test", **json.loads(args.task_kwargs)))
    trained = copy.deepcopy(base)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * args.noise * p.float().pow(2).mean().sqrt())
    report = {}
    for name, prompts in (("in_domain", [r["prompt"] for r in rows]),
                          ("general", [[{"role": "user", "content": q}] for q, _ in FACTS])):
        clock = Clock()
        samples = sample_base_responses(base, tok, prompts, args.max_new_tokens, seed=0, batch_size=args.batch_size)
        sample_t = clock.lap()
        cache = base_hidden_states(base, tok, prompts, samples, batch_size=args.batch_size)
        cache_t = clock.lap()
        kl = kl_to_base(base, trained, tok, prompts, samples, batch_size=args.batch_size, base_hidden=cache)
        kl_t = clock.lap()
        zero = kl_to_base(base, base, tok, prompts, samples, batch_size=args.batch_size, base_hidden=cache, progress=False)
        report[name] = {"prompts": len(prompts), "tokens": kl["num_tokens"], "sample": sample_t, "base_cache": cache_t,
                        "kl_per_model": kl_t, "kl_perturbed": kl["kl"], "kl_ci": [kl["ci_low"], kl["ci_high"]],
                        "kl_self": zero["kl"]}
    clock = Clock()
    nll_base = heldout_nll(base, tok, rows, batch_size=args.batch_size)
    report["heldout_nll"] = {"rows": len(rows), "tokens": nll_base["num_tokens"], "per_model": clock.lap(),
                             "nll_base": nll_base["nll"], "ci": [nll_base["ci_low"], nll_base["ci_high"]]}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
