"""Train several methods on the same data and budget, sweep learning rates and seeds, evaluate each unit, report them.

``trl-onpolicy compare --config recipes/compare/<recipe>.yaml`` (flags after the config override top-level keys:
``--output_dir DIR``, ``--methods base,sft,idft``, ``--sweep '{seeds: [0]}'``). One YAML names:

- ``model_name_or_path``: the starting model of every method (a folder, Hub name, or ``embedded:smollm2-135m-instruct``);
- ``data``: the SFT corpus (``task`` of `trl_onpolicy.data.datasets.math_word_problems`, ``n``, ``seed``, ``task_kwargs``; or
  ``path`` to a local file/folder with prompt, completion and answer columns); ``prompt_template`` (with
  ``{question}``: the user turn of the training rows, and of the in-domain/OOD sets, KL prompts and NLL rows unless a
  set gives its own); ``dev_n`` (a DEV split of held-out training-split problems on which each method's rate is chosen);
- ``eval``: the evaluation sets (`trl_onpolicy.eval.evaluation.EvalSet` mappings: in-domain, out-of-domain, retention) and
  the generation settings (`trl_onpolicy.eval.evaluation.EvalConfig` fields);
- ``methods``: any of `METHODS`, as names or mappings ``{name, label, args, learning_rates, seeds}`` (``args`` go to
  the method's trainer config, e.g. ``{beta: 0.1}``; ``learning_rates`` replaces the sweep's grid for this method;
  ``label`` tells two runs of one method apart);
- ``sweep``: ``seeds`` (every unit is trained once per seed) and ``learning_rates`` (the grid every method uses unless
  it gives its own ``learning_rates``); without it: one seed (``budget.seed``) and one rate (``budget.learning_rate``);
- ``budget``: what every method shares: the same training prompts, ``max_steps`` optimizer steps (and optionally a
  ``max_tokens`` cap on non-padding tokens), ``per_device_train_batch_size``, ``gradient_accumulation_steps``,
  ``max_length`` and the optimizer settings;
- ``metrics``: forgetting and learning signals next to accuracy (`MetricsSpec`): KL(base || trained) on held-out
  in-domain prompts and on general prompts, and the held-out NLL of reference solutions;
- ``dry_run``: ``--dry_run true`` parses the recipe and prints its units and estimated cost, running nothing;
- ``num_threads``: torch CPU threads (on a shared CPU, 1 can be many times faster than the default);
- ``only``: method labels (a list or ``--only base,sft``) to run now out of the recipe's ``methods``, keeping their
  settings (e.g. a first pass before the best rates of the other methods are known);
- ``contrasts``: extra paired comparisons for the report, ``["idft vs dft", "idft_online vs idft"]``: a − b on each
  seed both finished, at each learning rate both ran (the report always pairs every method with SFT);
- ``shard``: ``"auto"`` lets any number of processes share the sweep: each takes the next unit that is neither
  finished nor held by another process (start one per core with ``--shard auto``; they balance themselves);
  ``"i/n"`` runs every n-th unit starting at i (a fixed split). A unit is claimed with a lock file under
  ``output_dir/.claims`` while it runs, so two processes never train the same unit, whatever their shard settings; a
  process's final report includes every unit finished by then;
- ``pairs`` (DPO/SimPO, `trl_onpolicy.eval.preferences.PairConfig` fields), ``hinted`` (`trl_onpolicy.hinted.realign.RealignConfig`
  fields for the Hinted-Decoding corpus), ``online`` (`trl_onpolicy.trainer.online.HintedDataCollator` keyword
  arguments: decoding settings of online IDFT), ``sdft`` (settings of `trl_onpolicy.trainer.sdft.train_sdft`).

Units. Every (method, learning rate, seed) is one unit, trained from the same base weights on the same prompts in the
same data order for a given seed (``seed`` and ``data_seed`` of the trainer), so units of two methods with the same
seed are paired. ``base`` is evaluated once (once per seed when evaluation samples, ``eval.temperature > 0``).
``sft``/``dft``/``eaft``/``idft`` train with `IDFTTrainer` (token_loss nll/dft/eaft/idft) on the reference solutions;
``sft_hinted``/``idft_hinted`` train on the corpus re-aligned to the base model with Hinted Decoding (built once,
cached); ``idft_online`` re-aligns every batch with the current weights (``sft_online``: the same with plain NLL,
`trl_onpolicy.trainer.online.OnlineSFTTrainer`); ``sdft`` is TRL's self-distillation
(`trl.experimental.sdft.SDFTTrainer` through `trl_onpolicy.trainer.sdft`, privileged context = the reference solution);
``dpo`` (TRL's `DPOTrainer`, reference model = a frozen copy of the base) and ``simpo`` (TRL's `CPOTrainer` with
``loss_type="simpo", cpo_alpha=0``) train on preference pairs (chosen = reference, rejected = the base model's own wrong
sample; built once, cached).

Output (``output_dir``): ``methods/<label>/lr<rate>_seed<seed>/result.json`` (one per unit, written atomically, with
``eval/`` per-sample jsonl beside it), ``corpora/`` (pairs, re-aligned corpus, DDT phi, the base model's samples for
the KL estimates: each with the fingerprint of what produced it), ``results.json``, ``results.md``, ``frontier.png``
(in-domain gain against KL to base, and retention against in-domain gain) and ``compare_accuracy.png``.
Aggregation, pairing and plots live in `trl_onpolicy.compare.report`.

Checks before any work: the whole recipe (unknown keys, numeric fields through `trl_onpolicy.utils.validation`, method names,
each method's trainer configuration), the model folder, the training data, every evaluation set and metric prompt set,
and the output folder. Nothing is trained or written when one fails.

Resuming and staleness: run the same command again. A unit whose result.json says ``"status": "ok"`` and whose
recorded fingerprint (start-model weights, training data, evaluation sets and settings, metric settings, and every
setting of the unit: method, args, learning rate, seed, budget, corpus settings) equals this run's is skipped. A unit
whose fingerprint differs is recomputed (the message says what changed); until it is, the report shows its old
result marked with what changed (e.g. "model changed"), never as a result of this configuration. A failed unit is
retried (``rerun_failed: false`` keeps the failure). A unit that raises is recorded as failed with its error and the
others go on; the command then exits with status 1. ``--report_only true`` runs nothing: it writes results.md,
results.json and the plots from the stored units (an interim report of a study still in progress, or a published
study re-rendered: units of another configuration are kept and marked; its exit status is 1 while units of this
configuration are missing). A report is never replaced by an empty one. Every unit records the versions of torch,
transformers, trl and trl_onpolicy that produced it; the report lists them and says where units differ.

Precision: ``dtype`` (float32, bfloat16, float16) is the dtype the base model is evaluated in and builds the cached
corpora in; training always keeps float32 master weights and runs under ``dtype`` autocast (TRL's ``bf16``/``fp16``).
Evaluation generates with the in-memory model (``eval.backend: hf``; vLLM, which loads weights from a folder, is
refused).
"""

from __future__ import annotations

import sys
from pathlib import Path

from trl_onpolicy.compare.config import load_config_file
from trl_onpolicy.compare.runner import Comparison
from trl_onpolicy.compare.units import estimate_seconds, sweep_units


def _parse_overrides(rest: list[str]) -> dict:
    import yaml

    overrides = {}
    i = 0
    while i < len(rest):
        key = rest[i]
        if not key.startswith("--"):
            raise ValueError(f"Unexpected argument {key!r}; overrides look like `--output_dir DIR`.")
        key = key[2:]
        if "=" in key:
            key, value = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(rest):
                raise ValueError(f"--{key} needs a value.")
            value = rest[i + 1]
            i += 2
        overrides[key] = yaml.safe_load(value)
    return overrides


def dry_run_text(config) -> str:
    """The units of a recipe per method label and their estimated cost (``--dry_run true``; nothing is loaded)."""
    units = sweep_units(config)
    est = estimate_seconds(config, units)
    counts: dict[str, int] = {}
    for u in units:
        counts[u.spec.label] = counts.get(u.spec.label, 0) + 1
    lines = [f"[compare] dry run: {len(units)} units"]
    lines += [f"  {label}: {n} unit(s) x ~{est['per_unit'][label] / 60:.1f} min" for label, n in counts.items()]
    lines.append(f"  estimated cost: {est['total'] / 3600:.2f} core-hours, ~{est['wall_hours']:.2f} h wall with "
                 f"{est['processes']} processes (--shard auto) on an idle {est['processes']}-core machine")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run a comparison; exit status 0 when every unit finished, 1 when any failed or was unavailable (bad input
    raises ValueError/FileNotFoundError before any work: `trl_onpolicy.cli.commands` turns that into exit status 2)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or "--config" not in argv:
        print(__doc__)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    i = argv.index("--config")
    if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
        raise ValueError("--config needs the path of a compare recipe (YAML).")
    path = argv[i + 1]
    rest = argv[:i] + argv[i + 2 :]
    config = load_config_file(path, _parse_overrides(rest))
    if config.dry_run:
        print(dry_run_text(config))
        return 0
    comparison = Comparison(config)
    payload = comparison.run()
    print((Path(config.output_dir) / "results.md").read_text())
    failed = [key for key, r in payload["units"].items() if r.get("status") != "ok"]
    stale = [key for key, r in payload["units"].items() if r.get("stale")]
    if stale:
        print(f"[compare] {len(stale)} unit(s) in the report were produced under a different configuration (marked "
              "there); run without --report_only to recompute them", file=sys.stderr)
    if config.report_only:
        current = len(payload["units"]) - len(stale)
        missing = len(comparison.units()) - current
        if missing:
            print(f"[compare] report only: {missing} unit(s) have not finished under this configuration; exit status 1",
                  file=sys.stderr)
        return 1 if missing or failed else 0
    if failed:
        print(f"[compare] {len(failed)} unit(s) did not finish: {failed} (see results.md); exit status 1", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
