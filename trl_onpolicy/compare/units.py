"""The units of a sweep and their bookkeeping: which units a recipe has, where each one's result lives, the claim a
process holds while it runs one, whether a stored result can be reused (resume) or is stale, and the lock under
which a shared corpus is built.

Every (method, learning rate, seed) is one `Unit`. A unit's result (``methods/<label>/lr<rate>_seed<seed>/
result.json``) records the fingerprint of what produced it; a re-run reuses it only when that fingerprint equals the
current one (`resume_decision`). Processes that share one output folder claim a unit with a non-blocking file lock
under ``output_dir/.claims`` (`claim_path`), and build each cached corpus under a waiting lock (`corpus_lock`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trl_onpolicy.utils.fingerprint import changed_keys
from trl_onpolicy.utils.io import file_lock


def rate_text(lr: float) -> str:
    """A learning rate as short text: 1e-4, 2.5e-5."""
    mantissa, exponent = f"{lr:.3e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


@dataclass
class Unit:
    """One (method, learning rate, seed) of the sweep; ``lr`` is None for ``base``, ``seed`` None for a base model
    evaluated greedily (it depends on no seed). ``spec`` is the method's `trl_onpolicy.compare.config.MethodSpec`."""

    spec: Any
    lr: float | None
    seed: int | None

    @property
    def key(self) -> str:
        parts = [self.spec.label] + ([f"lr={rate_text(self.lr)}"] if self.lr is not None else [])
        return "/".join(parts + ([f"seed={self.seed}"] if self.seed is not None else []))

    @property
    def folder_name(self) -> str:
        parts = ([f"lr{rate_text(self.lr)}"] if self.lr is not None else []) + ([f"seed{self.seed}"] if self.seed is not None else [])
        return "_".join(parts) or "unit"


def sweep_units(cfg) -> list[Unit]:
    """Every unit of a `CompareConfig`'s sweep, seed by seed (a sweep cut short has whole seeds of every method
    first); base first, once (per seed only when evaluation samples)."""
    units: list[Unit] = []
    sampled_eval = cfg.eval_config.temperature > 0
    for spec in cfg.method_specs:
        if spec.name == "base":
            units += [Unit(spec, None, s) for s in cfg.seeds_of(spec)] if sampled_eval else [Unit(spec, None, None)]
    seeds = []
    for spec in cfg.method_specs:
        seeds += [s for s in cfg.seeds_of(spec) if s not in seeds]
    for seed in seeds:
        for spec in cfg.method_specs:
            if spec.name != "base" and seed in cfg.seeds_of(spec):
                units += [Unit(spec, lr, seed) for lr in cfg.rates_of(spec)]
    # two entries of one label (e.g. a rate scan at one seed, then the best rate at every seed) may name a unit twice
    return list({u.key: u for u in units}.values())


def unit_dir(out: Path, unit: Unit) -> Path:
    """``out/methods/<label>`` for a greedy base unit, else ``out/methods/<label>/<folder_name>``."""
    base = Path(out) / "methods" / unit.spec.label
    return base if unit.spec.name == "base" and unit.seed is None else base / unit.folder_name


def claim_path(out: Path, unit: Unit) -> Path:
    """The lock file a process holds while it runs ``unit`` (outside the unit's folder, which a run may replace)."""
    folder = unit_dir(out, unit).relative_to(Path(out) / "methods")
    return Path(out) / ".claims" / f"{'_'.join(folder.parts)}.lock"


def corpus_lock(name):
    """Run a cache builder under ``<comparison.out>/corpora/.<name>.lock``, waiting for another process that builds
    the same corpus (``name``: a string, or a function of the builder's arguments after the comparison). The
    decorated function takes the `Comparison` first."""

    def wrap(fn):
        @functools.wraps(fn)
        def inner(comparison, *args, **kwargs):
            lock = name(*args) if callable(name) else name
            with file_lock(comparison.out / "corpora" / f".{lock}.lock"):
                return fn(comparison, *args, **kwargs)

        return inner

    return wrap


def changed_settings(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted names of the settings that differ between two unit settings mappings."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += changed_settings(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def staleness(previous: dict, fingerprint: dict) -> list[str]:
    """What changed since a stored result was produced: the fingerprint keys that differ (``["model"]``, ...), or
    ``["fingerprint"]`` for a result an older compare wrote without one; [] when it is current."""
    if previous.get("fingerprint") is None:
        return ["fingerprint"]
    return changed_keys(previous.get("fingerprint"), fingerprint)


def resume_decision(previous: dict | None, fingerprint: dict, settings: dict, rerun_failed: bool) -> tuple[bool, str]:
    """Whether a unit's stored result (``previous``, None when there is none) is reused, and why (a message)."""
    if previous is None:
        return False, ""
    changed = staleness(previous, fingerprint)
    if changed == ["fingerprint"]:
        return False, "the stored result has no fingerprint (an older compare wrote it); recomputing it"
    if changed:
        detail = changed_settings(previous.get("settings") or {}, settings) if "settings" in changed else []
        what = ", ".join(changed) + (f" ({', '.join(detail)})" if detail else "")
        return False, f"the stored result was produced from a different {what}; recomputing it"
    if previous.get("status") == "ok" or not rerun_failed:
        return True, f"already done ({previous.get('status')}), skipping"
    return False, ""


# ---- cost estimate -----------------------------------------------------------------------------------------------
# Seconds on one core (one torch thread, two processes sharing a 2-core machine), measured in the first CPU study
# (studies/smollm2_cpu, SmolLM2-135M, median units): 8 steps of 8 trained in 65 s; online IDFT took 182 s, i.e.
# ~14.6 s more per step to re-align 8 responses of up to 64 tokens; 420 evaluation problems (12,720 problem x
# max-new-token slots) in 145 s; KL on 128 prompts x 48 sampled tokens plus the NLL of 128 solutions in 72 s;
# ~10 s to load and save. Preference and self-distillation methods ran 2-3x SFT's training time.
TRAIN_STEP_S = 8.1  # per optimizer step of 8 sequences
ONLINE_STEP_S = 14.6  # re-alignment per step of 8 prompts at 64 new tokens
TRAIN_FACTOR = {"dpo": 3.0, "simpo": 2.1, "sdft": 2.0}
EVAL_SLOT_S = 145 / 12_720  # per problem and max-new-token slot
KL_SLOT_S = 55 / (128 * 48)  # per prompt and sampled token
NLL_ROW_S = 17 / 128
UNIT_OVERHEAD_S = 10.0


def estimate_seconds(cfg, units: list[Unit] | None = None, processes: int = 2) -> dict:
    """A rough cost of a sweep from the first study's timings (the constants above): ``per_unit`` (label -> seconds
    of one unit), ``total`` (core-seconds over ``units``, default every unit of the sweep) and ``wall`` (hours with
    ``processes`` shards on as many cores). It scales training by steps x samples per step, re-alignment by its new
    tokens, evaluation by problems x new tokens (of every set and the DEV split) and the metrics by their sizes."""
    units = sweep_units(cfg) if units is None else units
    ev, m, b = cfg.eval_config, cfg.metrics, cfg.budget
    slots = sum((s.n or (60 if s.task == "facts" else 100)) * (s.max_new_tokens or ev.max_new_tokens) for s in cfg.eval_sets)
    slots += (cfg.data.dev_n or 0) * ev.max_new_tokens
    evaluation = slots * EVAL_SLOT_S * ev.num_samples
    measured = (m.kl_n + m.general_n) * m.kl_max_new_tokens * KL_SLOT_S * m.kl + m.nll_n * NLL_ROW_S * m.nll
    scale = b.max_steps * b.per_device_train_batch_size * b.gradient_accumulation_steps / 8
    per_label = {}
    for unit in units:
        name = unit.spec.name
        train = 0.0 if name == "base" else scale * TRAIN_STEP_S * TRAIN_FACTOR.get(name, 1.0)
        if name in ("idft_online", "sft_online"):
            train += scale * ONLINE_STEP_S * int(cfg.online.get("max_new_tokens", 64)) / 64
        per_label[unit.spec.label] = train + evaluation + measured + UNIT_OVERHEAD_S
    total = sum(per_label[u.spec.label] for u in units)
    return {"units": len(units), "per_unit": per_label, "total": total, "wall_hours": total / processes / 3600,
            "processes": processes}
