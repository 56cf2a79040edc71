"""`IDFTConfig` / `IDFTTrainer` through real training steps on a tiny offline model.

- parity with TRL's own `SFTTrainer` (loss per step and final parameters) for `token_loss="nll"`/`"dft"` and for IDFT
  at gamma = 0 / 1, in plain, padding-free, packing, gradient-accumulation and LoRA set-ups;
- the loss and logged statistics of a step against a float64 recomputation from the model's full logits (IDFT, EAFT);
- the IDFT schedule across save / resume;
- evaluation, assistant-only and completion-only loss, and every invalid configuration.

Determinism: the tiny Qwen2 model has no dropout (attention_dropout = 0), LoRA runs use lora_dropout = 0, every
trainer is built right after seeding, and both trainers of a comparison shuffle with the same `seed`.
"""

import math
import warnings

import pytest
import torch
from datasets import Dataset
from transformers import TrainerCallback
from trl import SFTConfig, SFTTrainer

from conftest import arithmetic_examples
from trl_onpolicy import IDFTConfig, IDFTTrainer
from trl_onpolicy.losses import idft_schedule
from trl_onpolicy.testing.tiny import make_tiny_model

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

COMMON = dict(
    report_to="none",
    save_strategy="no",
    logging_steps=1,
    learning_rate=5e-3,
    per_device_train_batch_size=4,
    max_steps=2,
    seed=0,
    disable_tqdm=True,
    dataloader_num_workers=0,
)
CPU = dict(use_cpu=True, bf16=False)  # SFTConfig needs both on a CPU-only machine; IDFTConfig defaults to them

SETUPS = {
    "plain": {},
    "no-grad-ckpt": {"gradient_checkpointing": False},
    "padding-free": {"padding_free": True, "max_length": None},
    "packing-bfd": {"packing": True, "max_length": 80, "per_device_train_batch_size": 2},
    "ga2": {"gradient_accumulation_steps": 2, "per_device_train_batch_size": 2},
    "lora": {"peft": True},
    "cpu-bf16-autocast": {"use_cpu": True, "bf16": True},  # SFTConfig's own CPU default
}


def lora_config():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")


def build(trainer_cls, config_cls, tok, tmp_path, *, dataset=None, eval_dataset=None, peft=False, lm_head_scale=None,
          extra_vocab=0, callbacks=None, **kw):
    model, _ = make_tiny_model(tok, extra_vocab=extra_vocab)
    if lm_head_scale is not None:  # a sharper, far-from-uniform model: phi then spreads over IDFT's gamma regimes
        with torch.no_grad():
            model.lm_head.weight.mul_(lm_head_scale)
    args = config_cls(output_dir=str(tmp_path / "out"), **{**COMMON, **kw})
    torch.manual_seed(0)
    return trainer_cls(
        model=model,
        args=args,
        train_dataset=dataset if dataset is not None else Dataset.from_list(arithmetic_examples(16)),
        eval_dataset=eval_dataset,
        processing_class=tok,
        peft_config=lora_config() if peft else None,
        callbacks=callbacks,
    )


def train(trainer):
    trainer.train()
    history = [h for h in trainer.state.log_history if "loss" in h and "step" in h]
    params = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    return history, params


def assert_same_run(a, b, atol=1e-6):
    (hist_a, params_a), (hist_b, params_b) = a, b
    assert len(hist_a) == len(hist_b) > 0
    for x, y in zip(hist_a, hist_b):
        assert x["step"] == y["step"]
        assert abs(x["loss"] - y["loss"]) <= atol, (x, y)
        assert abs(x["grad_norm"] - y["grad_norm"]) <= atol * max(1.0, abs(x["grad_norm"])), (x, y)
    assert params_a.keys() == params_b.keys()
    for name in params_a:
        torch.testing.assert_close(params_a[name], params_b[name], atol=atol, rtol=0, msg=name)


def assert_trained(trainer_params, tok):
    """Parity must not hold trivially: training moved the parameters away from their initial values."""
    init, _ = make_tiny_model(tok)
    init = dict(init.named_parameters())
    moved = max((p - init[n.replace("base_model.model.", "").replace(".base_layer", "")]).abs().max().item()
                for n, p in trainer_params.items() if "lora_" not in n)
    lora = [p for n, p in trainer_params.items() if "lora_B" in n]
    assert moved > 1e-4 or any(p.abs().max() > 1e-4 for p in lora)


# --------------------------------------------------------------------------------------------- parity with SFTTrainer


@pytest.mark.parametrize("setup", list(SETUPS))
@pytest.mark.parametrize("loss", ["nll", "dft"])
def test_parity_with_sfttrainer(loss, setup, tiny_tokenizer, tmp_path):
    kw = dict(SETUPS[setup])
    peft = kw.pop("peft", False)
    sft_kw = {} if loss == "nll" else {"loss_type": "dft"}
    sft = train(build(SFTTrainer, SFTConfig, tiny_tokenizer, tmp_path / "sft", peft=peft, **{**CPU, **sft_kw, **kw}))
    idft = train(build(IDFTTrainer, IDFTConfig, tiny_tokenizer, tmp_path / "idft", peft=peft, token_loss=loss, **kw))
    assert_same_run(sft, idft)
    assert_trained(idft[1], tiny_tokenizer)
    if setup in ("plain", "ga2", "lora", "packing-bfd"):
        # IDFT with gamma fixed at 1 is DFT, with gamma fixed at 0 plain SFT
        gamma = 0.0 if loss == "nll" else 1.0
        special = build(IDFTTrainer, IDFTConfig, tiny_tokenizer, tmp_path / "g", peft=peft, token_loss="idft",
                        idft_gamma_min=gamma, idft_gamma_max=gamma, **kw)
        run = train(special)
        assert_same_run(sft, run)
        assert all(h["gamma_mean"] == pytest.approx(gamma, abs=1e-7) for h in run[0])


def test_dft_and_nll_really_differ(tiny_tokenizer, tmp_path):
    """Guards the parity tests: the set-up is sensitive to the loss (else any loss would 'match')."""
    a = train(build(IDFTTrainer, IDFTConfig, tiny_tokenizer, tmp_path / "a", token_loss="nll"))
    b = train(build(IDFTTrainer, IDFTConfig, tiny_tokenizer, tmp_path / "b", token_loss="dft"))
    c = train(build(IDFTTrainer, IDFTConfig, tiny_tokenizer, tmp_path / "c", token_loss="idft", lm_head_scale=6.0))
    assert abs(a[0][0]["loss"] - b[0][0]["loss"]) > 1.0
    assert max((a[1][n] - b[1][n]).abs().max() for n in a[1]) > 1e-4
    assert c[0][0]["gamma_mean"] not in (0.0, 1.0)


def messages_dataset(n=16):
    rows = arithmetic_examples(n)
    return Dataset.from_list([{"messages": r["prompt"] + r["completion"]} for r in rows])


@pytest.mark.parametrize(
    "name,dataset,kw",
    [
        ("assistant_only", messages_dataset, {"assistant_only_loss": True}),
        ("completion_only_off", lambda: Dataset.from_list(arithmetic_examples(16)), {"completion_only_loss": False}),
    ],
)
def test_loss_masking_options(name, dataset, kw, tiny_tokenizer, tmp_path):
    tok = tiny_tokenizer
    sft = build(SFTTrainer, SFTConfig, tok, tmp_path / "s", dataset=dataset(), loss_type="dft", **CPU, **kw)
    idft_trainer = build(IDFTTrainer, IDFTConfig, tok, tmp_path / "i", dataset=dataset(), token_loss="dft", **kw)
    # The option changes which tokens are trained: compare the label masks with the opposite setting
    flipped = {k: not v for k, v in kw.items()}
    other = build(IDFTTrainer, IDFTConfig, tok, tmp_path / "o", dataset=dataset(), token_loss="dft", **flipped)
    def trained(t):  # number of tokens that carry a label, over the whole collated training set
        batch = t.data_collator([t.train_dataset[i] for i in range(len(t.train_dataset))])
        return int((batch["labels"] != -100).sum())

    assert trained(idft_trainer) != trained(other)
    assert_same_run(train(sft), train(idft_trainer))


# ------------------------------------------------------------------- one step against a float64 manual recomputation


def manual_statistics(model, batch, vocab_size):
    """Per-token float64 statistics of the trained tokens, from the model's full logits (no fused head involved)."""
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "completion_mask", "assistant_masks")}
    with torch.no_grad():
        logits = model(**inputs).logits.double()[:, :-1]
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    logits, y = logits[mask], labels[mask]
    assert logits.shape[-1] == vocab_size
    lp_all = logits.log_softmax(-1)
    lp = lp_all.gather(-1, y[:, None]).squeeze(-1)
    entropy = -(lp_all.exp() * lp_all).sum(-1)
    top = logits.sort(-1, descending=True).values[:, :20].softmax(-1)
    return dict(lp=lp, entropy=entropy, phi=lp + entropy, top1=(logits.argmax(-1) == y).double(),
                topk_entropy=-(top * top.log()).sum(-1))


STEP_CASES = {
    "idft": dict(token_loss="idft"),
    "idft-v1-beta2": dict(token_loss="idft", idft_detach="gamma", idft_beta=2.0, idft_gamma_max=1.5),
    "idft-schedule": dict(token_loss="idft", idft_warmup_ratio=0.25, idft_transition_ratio=0.5, max_steps=4),
    "eaft-top20": dict(token_loss="eaft"),
    "eaft-top20-padding-free": dict(token_loss="eaft", padding_free=True, max_length=None),
    "eaft-top20-lora": dict(token_loss="eaft", peft=True),
    "eaft-full": dict(token_loss="eaft", eaft_entropy="full"),
    # k beyond the vocabulary: the top-k entropy covers all |V| logits, so it is normalised by ln |V|, not ln k
    "eaft-top-k-beyond-vocab": dict(token_loss="eaft", eaft_top_k=100_000),
}


@pytest.mark.parametrize("case", list(STEP_CASES))
def test_training_step_matches_manual_recomputation(case, tiny_tokenizer, tmp_path):
    """The logged loss and statistics of real training steps equal a float64 recomputation from the model's full logits
    on the same batch (sequential sampling makes the batch known in advance)."""
    kw = dict(STEP_CASES[case])
    peft = kw.pop("peft", False)
    kw.setdefault("max_steps", 1)
    trainer = build(IDFTTrainer, IDFTConfig, tiny_tokenizer, tmp_path, peft=peft, lm_head_scale=6.0, extra_vocab=7,
                    train_sampling_strategy="sequential", per_device_train_batch_size=4, **kw)
    args = trainer.args
    vocab = trainer.model.config.vocab_size
    assert vocab == len(tiny_tokenizer) + 7  # |V| is the model's output size, larger than the tokenizer's

    # Statistics of every step's batch, recomputed with the weights that step starts from
    expected = []

    class Recompute(TrainerCallback):
        def on_step_begin(self, _args, state, control, **kw_):
            batch = batches[state.global_step]
            expected.append(manual_statistics(trainer.model, batch, vocab))

    batches = [trainer._prepare_inputs(b) for b in trainer.get_train_dataloader()][: args.max_steps]
    assert len(batches) == args.max_steps
    trainer.add_callback(Recompute())
    history, _ = train(trainer)

    for step, (logged, st) in enumerate(zip(history, expected)):
        lp, phi, n = st["lp"], st["phi"], st["lp"].numel()
        lam = idft_schedule(step / args.max_steps, args.idft_warmup_ratio, args.idft_transition_ratio)
        if args.token_loss == "idft":
            g_raw = torch.exp(-phi / args.idft_beta).clamp(args.idft_gamma_min, args.idft_gamma_max)
            gamma = 1 + lam * (g_raw - 1)
            weight = lp.exp() ** gamma
            assert logged["idft_lambda"] == pytest.approx(lam, abs=1e-12)
            assert logged["gamma_mean"] == pytest.approx(gamma.mean().item(), abs=1e-5)
        elif args.eaft_entropy == "topk" and args.eaft_top_k >= vocab:
            weight = st["entropy"] / math.log(vocab)  # every logit is in the "top k"
        elif args.eaft_entropy == "topk":
            weight = st["topk_entropy"] / math.log(20)
        else:
            weight = st["entropy"] / math.log(vocab)
        loss = (-(weight * lp)).sum().item() / n
        assert logged["loss"] == pytest.approx(loss, rel=1e-5, abs=1e-7), step
        assert logged["weight_mean"] == pytest.approx(weight.mean().item(), rel=1e-5, abs=1e-7)
        assert logged["phi_mean"] == pytest.approx(phi.mean().item(), abs=1e-5)
        assert logged["phi_std"] == pytest.approx(phi.std(unbiased=False).item(), abs=1e-4)
        assert abs(logged["phi_below_-1"] - (phi < -1).double().mean().item()) <= 1.0 / n + 1e-12
        assert logged["entropy"] == pytest.approx(st["entropy"].mean().item(), abs=1e-5)
        assert logged["mean_token_accuracy"] == pytest.approx(st["top1"].mean().item(), abs=1.0 / n)
    # the sharp model puts tokens in every IDFT regime, so gamma is not trivially constant
    phi = torch.cat([st["phi"] for st in expected])
    assert (phi < -math.log(2)).any() and (phi > -math.log(2)).any()
    if case == "idft-schedule":
        assert [h["idft_lambda"] for h in history] == [0.0, 0.0, 0.5, 1.0]


# ---------------------------------------------------------------------------------------------------- evaluation


@pytest.mark.parametrize("loss", ["nll", "dft"])
def test_evaluation_matches_sfttrainer_and_logs_metrics(loss, tiny_tokenizer, tmp_path):
    eval_ds = Dataset.from_list(arithmetic_examples(12)[5:])
    sft_kw = {"loss_type": loss}
    sft = build(SFTTrainer, SFTConfig, tiny_tokenizer, tmp_path / "s", eval_dataset=eval_ds,
                per_device_eval_batch_size=3, **CPU, **sft_kw)
    idft = build(IDFTTrainer, IDFTConfig, tiny_tokenizer, tmp_path / "i", eval_dataset=eval_ds,
                 per_device_eval_batch_size=3, token_loss=loss)
    a, b = sft.evaluate(), idft.evaluate()
    for key in ("eval_loss", "eval_entropy", "eval_mean_token_accuracy"):
        assert b[key] == pytest.approx(a[key], abs=1e-6), key
    for key in ("eval_phi_mean", "eval_phi_std", "eval_phi_below_-1", "eval_weight_mean"):
        assert key in b and math.isfinite(b[key])
    assert "eval_phi_mean" in idft.state.log_history[-1]


def test_evaluation_during_idft_training(tiny_tokenizer, tmp_path):
    eval_ds = Dataset.from_list(arithmetic_examples(8))
    trainer = build(IDFTTrainer, IDFTConfig, tiny_tokenizer, tmp_path, eval_dataset=eval_ds, eval_strategy="steps",
                    eval_steps=1, idft_warmup_ratio=0.5)
    trainer.train()
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    assert [h["step"] for h in evals] == [1, 2]
    for h in evals:
        assert {"eval_phi_mean", "eval_phi_std", "eval_gamma_mean", "eval_weight_mean", "eval_idft_lambda"} <= h.keys()
    trains = [h for h in trainer.state.log_history if "loss" in h]
    assert "idft_lambda" in trains[0] and "eval_phi_mean" not in trains[0]


# ------------------------------------------------------------------------------------------- schedule across resume


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_schedule_continues_after_resume(tiny_tokenizer, tmp_path):
    # No use_cpu / bf16 here: IDFTConfig's defaults must work on a CPU-only machine
    kw = dict(token_loss="idft", idft_warmup_ratio=0.25, idft_transition_ratio=0.5, max_steps=8,
              per_device_train_batch_size=2, lm_head_scale=6.0)
    full = build(IDFTTrainer, IDFTConfig, tiny_tokenizer, tmp_path / "full", **kw)
    full_run = train(full)

    first = build(IDFTTrainer, IDFTConfig, tiny_tokenizer, tmp_path / "part", save_strategy="steps", save_steps=4,
                  callbacks=[StopAt(4)], **kw)
    first.train()
    assert first.state.global_step == 4
    checkpoint = tmp_path / "part" / "out" / "checkpoint-4"
    assert checkpoint.is_dir()
    resumed = build(IDFTTrainer, IDFTConfig, tiny_tokenizer, tmp_path / "part", save_strategy="steps", save_steps=4,
                    **kw)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    hist = [h for h in resumed.state.log_history if "loss" in h and "step" in h]
    resumed_run = (hist, {k: v.detach().clone() for k, v in resumed.model.named_parameters()})

    expected = [idft_schedule(s / 8, 0.25, 0.5) for s in range(8)]  # lambda of step s+1 uses global_step s
    assert [h["idft_lambda"] for h in full_run[0]] == pytest.approx(expected, abs=1e-12)
    assert [h["idft_lambda"] for h in hist] == pytest.approx(expected, abs=1e-12)
    assert 0.0 in expected and 1.0 in expected and any(0 < v < 1 for v in expected)
    assert [h["step"] for h in hist] == list(range(1, 9))
    assert_same_run(full_run, resumed_run)
    for h_full, h_res in zip(full_run[0], hist):
        assert h_res["phi_mean"] == pytest.approx(h_full["phi_mean"], abs=1e-6)
        assert h_res["gamma_mean"] == pytest.approx(h_full["gamma_mean"], abs=1e-6)


# ------------------------------------------------------------------------------------------------- configuration


INVALID = [
    ("idft_beta", dict(idft_beta=0.0)),
    ("idft_beta", dict(idft_beta=-1.0)),
    ("idft_beta", dict(idft_beta=float("nan"))),
    ("idft_gamma_min", dict(idft_gamma_min=1.5, idft_gamma_max=1.0)),
    ("idft_gamma_min", dict(idft_gamma_min=-0.1)),
    ("idft_gamma_max", dict(idft_gamma_max=-1.0, idft_gamma_min=0.0)),
    ("idft_gamma_max", dict(idft_gamma_max=float("nan"))),
    ("idft_warmup_ratio", dict(idft_warmup_ratio=-0.1)),
    ("idft_warmup_ratio", dict(idft_warmup_ratio=1.5)),
    ("idft_transition_ratio", dict(idft_transition_ratio=1.01)),
    ("idft_transition_ratio", dict(idft_transition_ratio=float("nan"))),
    ("idft_transition_ratio", dict(idft_warmup_ratio=0.6, idft_transition_ratio=0.5)),
    ("token_loss", dict(token_loss="sft")),
    ("idft_detach", dict(idft_detach="logits")),
    ("eaft_entropy", dict(eaft_entropy="half")),
    ("eaft_top_k", dict(eaft_top_k=1)),
    ("loss_type", dict(loss_type="kto")),
    ("token_loss", dict(loss_type="dft", token_loss="eaft")),  # contradicts TRL's DFT
    ("label_smoothing_factor", dict(label_smoothing_factor=0.1)),
]


@pytest.mark.parametrize("field_name,kw", INVALID, ids=[f"{f}-{i}" for i, (f, _) in enumerate(INVALID)])
def test_invalid_config_values(field_name, kw, tmp_path):
    with pytest.raises(ValueError, match=rf"IDFTConfig\.{field_name}="):
        IDFTConfig(output_dir=str(tmp_path), report_to="none", **kw)


@pytest.mark.parametrize("pc_kw", [dict(sp_size=2, sp_backend="deepspeed"), dict(cp_size=2)])
def test_sequence_and_context_parallelism_refused(pc_kw, tmp_path):
    from accelerate import ParallelismConfig

    with pytest.raises(ValueError, match=r"IDFTConfig\.parallelism_config=.*sp_size=1 and cp_size=1"):
        IDFTConfig(output_dir=str(tmp_path), report_to="none", parallelism_config=ParallelismConfig(**pc_kw))


def test_valid_edge_values_construct(tmp_path):
    for kw in (dict(idft_gamma_min=0.0, idft_gamma_max=0.0), dict(idft_warmup_ratio=0.5, idft_transition_ratio=0.5),
               dict(idft_warmup_ratio=1.0), dict(loss_type="chunked_nll"), dict(token_loss="eaft", eaft_top_k=2)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cfg = IDFTConfig(output_dir=str(tmp_path), report_to="none", **kw)
        assert cfg.loss_type == "nll"


def test_trainer_refuses_compute_loss_func_however_passed(tiny_model, tmp_path):
    model, tok = tiny_model
    ds = Dataset.from_list(arithmetic_examples(4))
    args = IDFTConfig(output_dir=str(tmp_path), report_to="none")
    loss_func = lambda outputs, labels, num_items_in_batch=None: 0.0  # noqa: E731
    with pytest.raises(ValueError, match="compute_loss_func"):
        IDFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, compute_loss_func=loss_func)
    # positionally, in SFTTrainer's order: model, args, data_collator, train_dataset, eval_dataset,
    # processing_class, compute_loss_func
    with pytest.raises(ValueError, match="compute_loss_func"):
        IDFTTrainer(model, args, None, ds, None, tok, loss_func)


def test_loss_type_dft_is_token_loss_dft(tmp_path):
    assert IDFTConfig(output_dir=str(tmp_path), report_to="none").token_loss == "idft"
    assert IDFTConfig(output_dir=str(tmp_path), report_to="none", loss_type="nll").token_loss == "idft"
    assert IDFTConfig(output_dir=str(tmp_path), report_to="none", loss_type="dft").token_loss == "dft"
    assert IDFTConfig(output_dir=str(tmp_path), report_to="none", loss_type="dft", token_loss="dft").token_loss == "dft"


def _outcome(config_cls, tmp_path, **kw):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cfg = config_cls(output_dir=str(tmp_path), report_to="none", **kw)
        return ("ok", cfg.bf16, cfg.fp16, cfg.use_cpu)
    except Exception as e:  # noqa: BLE001 - compare whatever TRL does
        return (type(e).__name__, str(e))


def test_bf16_defaults(tmp_path):
    on_accelerator = torch.cuda.is_available()
    cfg = IDFTConfig(output_dir=str(tmp_path), report_to="none")
    # TRL's bf16 default stays on accelerators; a CPU-only machine gets float32 instead of a crash
    assert cfg.bf16 is on_accelerator
    if not on_accelerator:
        assert _outcome(SFTConfig, tmp_path)[0] == "ValueError"  # what IDFTConfig protects users from
        assert IDFTConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True).bf16 is False
    # Values the user sets explicitly behave exactly as in SFTConfig (error or not)
    for kw in (dict(bf16=True), dict(bf16=True, use_cpu=True), dict(bf16=False), dict(fp16=True),
               dict(fp16=True, use_cpu=True)):
        assert _outcome(IDFTConfig, tmp_path, **kw) == _outcome(SFTConfig, tmp_path, **kw), kw
