"""One SDFT unit on the embedded SmolLM2-135M-Instruct (trl_onpolicy.trainer.sdft.train_sdft), timed and evaluated like a
compare unit: the same training problems, budget and in-domain evaluation set as the SFT pilot. Results: docs/pilot.md.

    OMP_NUM_THREADS=1 python scripts/pilot_sdft.py --max_steps 8 --batch 8 --learning_rate 1e-4
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="chain_sum")
    parser.add_argument("--task_kwargs", default='{"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 1}')
    parser.add_argument("--n_train", type=int, default=256)
    parser.add_argument("--n_eval", type=int, default=100)
    parser.add_argument("--max_steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--max_completion_length", type=int, default=32)
    parser.add_argument("--output_dir", default="runs/pilot/sdft")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from trl_onpolicy.data.datasets import math_word_problems
    from trl_onpolicy.eval.evaluation import EvalConfig, EvalSet, evaluate
    from trl_onpolicy.utils.models import load_model
    from trl_onpolicy.trainer.sdft import train_sdft

    kwargs = json.loads(args.task_kwargs)
    model, tok = load_model("embedded:smollm2-135m-instruct", "float32")
    rows = list(math_word_problems(args.n_train, seed=0, task=args.task, **kwargs))
    t0, c0 = time.perf_counter(), time.process_time()
    model = train_sdft(model, tok, rows, {
        "max_steps": args.max_steps, "per_device_train_batch_size": args.batch, "learning_rate": args.learning_rate,
        "lr_scheduler_type": "constant", "max_completion_length": args.max_completion_length, "seed": 0,
    }, args.output_dir + "/trainer")
    t1, c1 = time.perf_counter(), time.process_time()
    sets = [EvalSet(name=args.task, role="in_domain", task=args.task, n=args.n_eval, seed=1, task_kwargs=kwargs)]
    res = evaluate(model, tok, sets, EvalConfig(batch_size=16, max_new_tokens=32), args.output_dir + "/eval")
    t2, c2 = time.perf_counter(), time.process_time()
    m = res[args.task]
    print(json.dumps({"train_wall_s": round(t1 - t0, 1), "train_cpu_s": round(c1 - c0, 1),
                      "eval_wall_s": round(t2 - t1, 1), "eval_cpu_s": round(c2 - c1, 1), "accuracy": m["accuracy"],
                      "ci": [m["ci_low"], m["ci_high"]], "n": m["num_prompts"]}))


if __name__ == "__main__":
    main()
