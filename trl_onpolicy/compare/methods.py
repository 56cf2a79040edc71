"""The methods a comparison trains: a registry of small builders, looked up by method name.

Each `Method` in `REGISTRY` says how one recipe name trains, in three steps that `Comparison.train` runs in order:

1. ``config(comparison, args, max_length)``: the trainer configuration from the unit's arguments (the shared budget,
   the unit's rate and seed, then the method's ``args``). Also built during validation, so a bad ``args`` value
   stops the run before any training. None when an optional package is missing (the unit is then "unavailable").
2. ``corpus(comparison, model, tokenizer, info)``: the training data, built with the base model (cached corpora:
   preference pairs, the Hinted-Decoding corpus, DDT phi); records what it used in ``info``.
3. ``trainer(comparison, unit, config, model, tokenizer, data)``: the TRL trainer.

``settings(comparison)`` adds the corpus settings that change a unit's result to its fingerprint. ``base`` trains
nothing (no builders). Adding a method is one `register` call; `METHODS` lists the names in recipe order.
"""

from __future__ import annotations

import copy
import importlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass

from trl_onpolicy.compare.metrics import corpus_phi
from trl_onpolicy.compare.units import corpus_lock
from trl_onpolicy.utils.io import atomic_folder, read_json, write_json_atomic

# the token-loss family: IDFTTrainer with this token_loss (on the reference or the Hinted-Decoding corpus)
TOKEN_LOSS = {"sft": "nll", "dft": "dft", "eaft": "eaft", "idft": "idft", "sft_hinted": "nll", "idft_hinted": "idft"}


class MethodUnavailable(RuntimeError):
    """A method whose implementation (module or optional package) is not available in this installation."""


@dataclass(frozen=True)
class Method:
    """How one method trains (see the module docstring); ``base`` has no builders."""

    name: str
    config: Callable | None = None
    corpus: Callable | None = None
    trainer: Callable | None = None
    settings: Callable | None = None

    @property
    def trains(self) -> bool:
        return self.trainer is not None


REGISTRY: dict[str, Method] = {}


def register(name: str, **builders) -> Method:
    REGISTRY[name] = Method(name, **builders)
    return REGISTRY[name]


def get_method(name: str) -> Method:
    return REGISTRY[name]


# ---- cached corpora -------------------------------------------------------------------------------------------------


def pair_settings(comparison) -> dict:
    cfg = comparison.cfg
    return {"seed": cfg.budget.seed, "batch_size": cfg.eval_config.batch_size,
            "max_new_tokens": cfg.eval_config.max_new_tokens, **cfg.pairs}


def hinted_settings(comparison) -> dict:
    return {"seed": comparison.cfg.budget.seed, **comparison.cfg.hinted}


@corpus_lock("pairs")
def preference_dataset(comparison, model, tokenizer):
    """Pairs from the base model's samples, built once into corpora/pairs (shared by dpo and simpo, every rate and
    seed); rebuilt when the model, the data or the pair settings changed."""
    from datasets import load_from_disk

    from trl_onpolicy.eval.preferences import PairConfig, make_preference_dataset

    folder = comparison.out / "corpora" / "pairs"
    fp = comparison.cache_fingerprint(**pair_settings(comparison))
    if (folder / "pairs_stats.json").is_file() and not comparison.stale("corpora/pairs", read_json(folder / "fingerprint.json"), fp):
        return load_from_disk(str(folder)), json.loads((folder / "pairs_stats.json").read_text())
    config = PairConfig(**pair_settings(comparison))
    built = {}

    def write(tmp):
        built["stats"] = make_preference_dataset(model, tokenizer, comparison.train_rows(), config, tmp)[1]
        write_json_atomic(tmp / "fingerprint.json", fp)

    if folder.exists():  # a stale cache (we hold the pairs lock: no other process reads or builds it now)
        shutil.rmtree(folder)
    atomic_folder(folder, write, note="compare preference pairs")
    return load_from_disk(str(folder)), built["stats"]


@corpus_lock("hinted")
def hinted_dataset(comparison, model, tokenizer):
    """The training corpus re-aligned to the base model with Hinted Decoding (trl_onpolicy.hinted.realign), cached.

    ``hinted.fallback`` decides what happens to prompts whose re-aligned response the realign filters drop
    (unfinished, wrong answer, low phi): ``"reference"`` (default) trains on the reference response for those
    prompts, so every method keeps the same prompts; ``"drop"`` trains on the kept responses only."""
    try:
        from trl_onpolicy.hinted.realign import RealignConfig, realign_dataset
    except ImportError as err:
        raise MethodUnavailable(f"Hinted-Decoding methods need trl_onpolicy.hinted.realign, which is not available ({err}).") from err
    from datasets import Dataset

    settings = hinted_settings(comparison)
    fallback = settings.pop("fallback", "reference")
    folder = comparison.out / "corpora" / "hinted"
    summary_path = folder / "summary.json"
    fp_path = comparison.out / "corpora" / "hinted_fingerprint.json"
    fp = comparison.cache_fingerprint(**settings)
    rows = comparison.train_rows()
    if not summary_path.is_file() or comparison.stale("corpora/hinted", read_json(fp_path), fp):
        if folder.exists():
            shutil.rmtree(folder)
        settings = {"model_name_or_path": str(comparison.model_path), "dataset_name": "compare:train",
                    "output_dir": str(folder), **settings}
        config = RealignConfig(**settings)
        data = Dataset.from_list([{k: r[k] for k in ("prompt", "question", "solution", "answer") if k in r} for r in rows])
        realign_dataset(model, tokenizer, data, config, progress=comparison.progress)
        write_json_atomic(fp_path, fp)
    summary = json.loads(summary_path.read_text())
    records = {}
    for shard in sorted((folder / "shards").glob("*.jsonl")):
        for line in shard.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                records[rec["index"]] = rec
    out, kept = [], 0
    for i, row in enumerate(rows):
        rec = records.get(i)
        if rec is not None and rec.get("keep"):
            out.append({"prompt": row["prompt"], "completion": rec["completion"]})
            kept += 1
        elif fallback == "reference":
            out.append({"prompt": row["prompt"], "completion": row["completion"]})
    if not out:
        raise RuntimeError(f"Hinted Decoding kept no sample (summary: {json.dumps(summary)[:500]}); nothing to train on.")
    summary = {**summary, "fallback": fallback, "num_realigned_used": kept, "num_reference_used": len(out) - kept}
    return Dataset.from_list(out), summary


# ---- the token-loss family (sft, dft, eaft, idft, on the reference or the Hinted-Decoding corpus) --------------------


def _idft_config(name: str):
    def build(comparison, args: dict, max_length: int):
        from trl_onpolicy.trainer.idft_config import IDFTConfig

        args.setdefault("token_loss", TOKEN_LOSS.get(name, "idft"))
        if name == "idft_online":
            args.setdefault("remove_unused_columns", False)
        return IDFTConfig(max_length=max_length, **args)

    return build


def _token_loss_corpus(hinted: bool):
    def build(comparison, model, tokenizer, info):
        if hinted:
            dataset, summary = hinted_dataset(comparison, model, tokenizer)
            info["corpus"] = f"hinted_{summary['fallback']}"
            info["hinted_summary"] = {k: v for k, v in summary.items() if not isinstance(v, (dict, list))}
        else:
            dataset = comparison.sft_dataset()
            info["corpus"] = "reference"
        info["train_phi"] = corpus_phi(comparison, info["corpus"], dataset, model, tokenizer)
        info["num_train_samples"] = len(dataset)
        return dataset

    return build


def _token_loss_trainer(comparison, unit, config, model, tokenizer, dataset):
    from trl_onpolicy.trainer.idft_trainer import IDFTTrainer

    return IDFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)


# ---- online IDFT: the corpus re-aligned every batch with the current weights ----------------------------------------


def _online_corpus(comparison, model, tokenizer, info):
    try:
        importlib.import_module("trl_onpolicy.trainer.online")
    except ImportError as err:
        raise MethodUnavailable(f"online methods need trl_onpolicy.trainer.online, which is not available ({err}).") from err
    from datasets import Dataset

    keys = ("prompt", "completion", "question", "solution", "answer")
    dataset = Dataset.from_list([{k: r[k] for k in keys if k in r} for r in comparison.train_rows()])
    info["corpus"] = "online"
    info["num_train_samples"] = len(dataset)
    info["train_phi"] = corpus_phi(comparison, "reference", comparison.sft_dataset(), model, tokenizer)
    info["train_phi_note"] = "phi of the reference corpus the online re-alignment starts from"
    return dataset


def _online_trainer(comparison, unit, config, model, tokenizer, dataset):
    from trl_onpolicy.trainer.idft_trainer import OnlineIDFTTrainer

    return OnlineIDFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                             hinted_collator_kwargs=dict(comparison.cfg.online) or None)


# ---- online SFT: the control of online IDFT (same per-batch re-alignment, plain NLL: TRL's SFTTrainer loss) ---------


def _sft_online_config(comparison, args: dict, max_length: int):
    from trl import SFTConfig

    args.setdefault("remove_unused_columns", False)  # the collator reads question/solution/answer
    return SFTConfig(max_length=max_length, **args)


def _sft_online_trainer(comparison, unit, config, model, tokenizer, dataset):
    from trl_onpolicy.trainer.online import OnlineSFTTrainer

    return OnlineSFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                            hinted_collator_kwargs=dict(comparison.cfg.online) or None)


# ---- SDFT: TRL's self-distillation, privileged context = the reference solution --------------------------------------


def _sdft_config(comparison, args: dict, max_length: int):
    try:
        from trl_onpolicy.trainer import sdft
    except ImportError:
        return None  # reported as unavailable when the unit runs
    output_dir = args.pop("output_dir")
    args = {"max_completion_length": max_length, **comparison.cfg.sdft, **args}
    sdft.sdft_config(output_dir, args)  # SDFTConfig checks the values now, before any training
    return args


def _sdft_corpus(comparison, model, tokenizer, info):
    try:
        from trl_onpolicy.trainer import sdft  # noqa: F401
    except ImportError as err:
        raise MethodUnavailable(f"sdft needs trl_onpolicy.trainer.sdft, which is not available ({err}).") from err
    rows = comparison.train_rows()
    info.update(corpus="reference", num_train_samples=len(rows))
    info["train_phi"] = corpus_phi(comparison, "reference", comparison.sft_dataset(), model, tokenizer)
    info["train_phi_note"] = "phi of the reference solutions, SDFT's privileged context (it trains on its own samples)"
    return rows


def _sdft_trainer(comparison, unit, config, model, tokenizer, rows):
    from trl_onpolicy.trainer import sdft

    return sdft.build_sdft_trainer(model, tokenizer, rows, config, comparison.unit_dir(unit) / "trainer")


# ---- DPO and SimPO on preference pairs (chosen = reference, rejected = the base model's wrong sample) ---------------


def _dpo_config(comparison, args: dict, max_length: int):
    from trl import DPOConfig

    return DPOConfig(max_length=max_length, **args)


def _simpo_config(comparison, args: dict, max_length: int):
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    try:
        from trl.experimental.cpo import CPOConfig
    except ImportError:
        return None  # reported as unavailable when the unit runs
    args.setdefault("loss_type", "simpo")
    args.setdefault("cpo_alpha", 0.0)
    return CPOConfig(max_length=max_length, **args)


def _pairs_corpus(comparison, model, tokenizer, info):
    pairs, stats = preference_dataset(comparison, model, tokenizer)
    info["pairs"] = stats
    info["corpus"] = "pairs"
    info["num_train_samples"] = len(pairs)
    chosen = pairs.map(lambda r: {"completion": r["chosen"]}).select_columns(["prompt", "completion"])
    rejected = pairs.map(lambda r: {"completion": r["rejected"]}).select_columns(["prompt", "completion"])
    info["train_phi"] = corpus_phi(comparison, "pairs_chosen", chosen, model, tokenizer)
    info["rejected_phi"] = corpus_phi(comparison, "pairs_rejected", rejected, model, tokenizer)
    return pairs


def _dpo_trainer(comparison, unit, config, model, tokenizer, pairs):
    from trl import DPOTrainer

    # the reference is a frozen copy of the start weights, kept in the comparison's dtype
    ref_model = copy.deepcopy(model).to(comparison.dtype).eval()
    for p in ref_model.parameters():
        p.requires_grad_(False)
    return DPOTrainer(model=model, ref_model=ref_model, args=config, train_dataset=pairs, processing_class=tokenizer)


def _simpo_trainer(comparison, unit, config, model, tokenizer, pairs):
    try:
        from trl.experimental.cpo import CPOTrainer
    except ImportError as err:
        raise MethodUnavailable(f"SimPO needs trl.experimental.cpo (TRL >= 1.x): {err}") from err
    return CPOTrainer(model=model, args=config, train_dataset=pairs, processing_class=tokenizer)


# ---- the registry (recipe order) -------------------------------------------------------------------------------------

register("base")
for _name in TOKEN_LOSS:
    _hinted = _name.endswith("_hinted")
    register(_name, config=_idft_config(_name), corpus=_token_loss_corpus(_hinted), trainer=_token_loss_trainer,
             settings=(lambda c: {"hinted": hinted_settings(c)}) if _hinted else None)
register("idft_online", config=_idft_config("idft_online"), corpus=_online_corpus, trainer=_online_trainer,
         settings=lambda c: {"online": c.cfg.online})
register("sft_online", config=_sft_online_config, corpus=_online_corpus, trainer=_sft_online_trainer,
         settings=lambda c: {"online": c.cfg.online})
register("sdft", config=_sdft_config, corpus=_sdft_corpus, trainer=_sdft_trainer, settings=lambda c: {"sdft": c.cfg.sdft})
register("dpo", config=_dpo_config, corpus=_pairs_corpus, trainer=_dpo_trainer,
         settings=lambda c: {"pairs": pair_settings(c)})
register("simpo", config=_simpo_config, corpus=_pairs_corpus, trainer=_simpo_trainer,
         settings=lambda c: {"pairs": pair_settings(c)})
del _name, _hinted

METHODS = tuple(REGISTRY)
