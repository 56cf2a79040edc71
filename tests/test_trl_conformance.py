"""TRL conformance: what `trl.SFTTrainer` documents, `IDFTTrainer` does the same way.

Each test builds an `SFTTrainer` and an `IDFTTrainer` (``token_loss="nll"``, the same loss) on identical tiny offline
models and data, and compares what a user can observe: the prepared dataset (input ids, labels, packing lengths), the
collated batch (padding, padding-free position ids), the loss of a batch, evaluation metrics, trainable parameters
under PEFT, argument conversion and the model card. Written from TRL's documentation of SFTTrainer (dataset formats:
conversational, prompt-completion, text with a formatting function, pre-tokenized; padding-free, packing, truncation,
PEFT, assistant-only loss, evaluation with one or several eval sets, `TrainingArguments` conversion, positional
arguments, model card tags); the reference each time is SFTTrainer itself, never our own output. No training beyond
what a behaviour needs.

The other token losses: DFT, and IDFT where its gamma is 1, against TRL's own ``loss_type="dft"``; IDFT and EAFT (which
TRL lacks) against a naive float64 recomputation from full logits, loss and gradient.
"""

import copy
import math
import warnings

import pytest
import torch
from datasets import Dataset
from transformers import TrainingArguments
from trl import SFTConfig, SFTTrainer

from conftest import arithmetic_examples
from trl_onpolicy import IDFTConfig, IDFTTrainer
from trl_onpolicy.testing.tiny import make_tiny_model

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

BASE = dict(report_to="none", save_strategy="no", logging_steps=1, per_device_train_batch_size=2, max_steps=1, seed=0,
            disable_tqdm=True, dataloader_num_workers=0, use_cpu=True, bf16=False, learning_rate=1e-2,
            gradient_checkpointing=False)


def messages_rows(n=6):
    """Conversational language-modeling rows with a system prompt."""
    rows = []
    for ex in arithmetic_examples(n):
        rows.append({"messages": [{"role": "system", "content": "You are a careful math tutor."}, *ex["prompt"],
                                  *ex["completion"]]})
    return rows


def pair(tok, tmp_path, rows, *, eval_rows=None, peft=False, formatting_func=None, **kw):
    """(SFTTrainer, IDFTTrainer) with the same model weights, data and settings."""
    out = []
    for cls, config_cls, extra in ((SFTTrainer, SFTConfig, {}), (IDFTTrainer, IDFTConfig, {"token_loss": "nll"})):
        model, _ = make_tiny_model(tok)
        peft_config = None
        if peft:
            from peft import LoraConfig

            peft_config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                                     task_type="CAUSAL_LM")
        args = config_cls(output_dir=str(tmp_path / cls.__name__), **{**BASE, **kw, **extra})
        out.append(cls(model, args=args, train_dataset=Dataset.from_list(rows),
                       eval_dataset=eval_rows, processing_class=tok, peft_config=peft_config,
                       formatting_func=formatting_func))
    return out


def first_batch(trainer, n=2):
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(n)])
    return {k: v for k, v in batch.items() if torch.is_tensor(v)}


def batch_loss(trainer, batch):
    trainer.model.train()
    with torch.no_grad():
        return trainer.compute_loss(trainer.model, dict(batch)).item()


def assert_same_data_and_loss(sft, idft, columns=("input_ids", "labels")):
    assert len(sft.train_dataset) == len(idft.train_dataset) > 0
    for col in columns:
        assert sft.train_dataset[col] == idft.train_dataset[col], col
    a, b = first_batch(sft), first_batch(idft)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert batch_loss(idft, b) == pytest.approx(batch_loss(sft, a), abs=1e-6)
    return a


def test_conversational_language_modeling(tiny_tokenizer, tmp_path):
    sft, idft = pair(tiny_tokenizer, tmp_path, messages_rows())
    batch = assert_same_data_and_loss(sft, idft)
    real = batch["attention_mask"].bool()  # a padded batch; language modeling trains every real token
    assert torch.equal(batch["labels"][real], batch["input_ids"][real]) and (batch["labels"][~real] == -100).all()


@pytest.mark.parametrize("conversational", [True, False])
def test_prompt_completion_masks_the_prompt(tiny_tokenizer, tmp_path, conversational):
    rows = arithmetic_examples(6, conversational=conversational)
    sft, idft = pair(tiny_tokenizer, tmp_path, rows)
    assert_same_data_and_loss(sft, idft)
    assert sft.completion_only_loss is idft.completion_only_loss is True
    assert idft.train_dataset[0]["labels"][0] == -100  # the prompt is not trained


def test_completion_only_loss_false_trains_the_prompt(tiny_tokenizer, tmp_path):
    sft, idft = pair(tiny_tokenizer, tmp_path, arithmetic_examples(6), completion_only_loss=False)
    assert_same_data_and_loss(sft, idft)
    assert -100 not in idft.train_dataset[0]["labels"]


def test_padding_free(tiny_tokenizer, tmp_path):
    sft, idft = pair(tiny_tokenizer, tmp_path, arithmetic_examples(6), padding_free=True, max_length=None)
    batch = assert_same_data_and_loss(sft, idft)
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 1 and "position_ids" in batch


def test_packing_bfd(tiny_tokenizer, tmp_path):
    sft, idft = pair(tiny_tokenizer, tmp_path, arithmetic_examples(8), packing=True, max_length=160)
    assert_same_data_and_loss(sft, idft, columns=("input_ids", "labels", "seq_lengths"))
    assert len(idft.train_dataset) < 8  # samples were packed together


def test_peft_lora(tiny_tokenizer, tmp_path):
    sft, idft = pair(tiny_tokenizer, tmp_path, arithmetic_examples(6), peft=True)
    trainable = lambda t: sorted(n for n, p in t.model.named_parameters() if p.requires_grad)  # noqa: E731
    assert trainable(idft) == trainable(sft) and all("lora_" in n for n in trainable(idft))
    assert_same_data_and_loss(sft, idft)


def test_assistant_only_loss(tiny_tokenizer, tmp_path):
    sft, idft = pair(tiny_tokenizer, tmp_path, messages_rows(), assistant_only_loss=True)
    assert_same_data_and_loss(sft, idft)
    labels, ids = idft.train_dataset[0]["labels"], idft.train_dataset[0]["input_ids"]
    trained = tiny_tokenizer.decode([i for i, lab in zip(ids, labels) if lab != -100])
    assert "tutor" not in trained and "What is" not in trained and "The answer is" in trained


def test_evaluation_during_training(tiny_tokenizer, tmp_path):
    rows = arithmetic_examples(8)
    sft, idft = pair(tiny_tokenizer, tmp_path, rows[:6], eval_rows=Dataset.from_list(rows[6:]), eval_strategy="steps",
                     eval_steps=1, max_steps=2)
    for t in (sft, idft):
        t.train()
    evals = [[h for h in t.state.log_history if "eval_loss" in h] for t in (sft, idft)]
    assert len(evals[0]) == len(evals[1]) == 2
    for a, b in zip(*evals):
        assert b["eval_loss"] == pytest.approx(a["eval_loss"], abs=1e-5)
        assert b["eval_mean_token_accuracy"] == pytest.approx(a["eval_mean_token_accuracy"], abs=1e-6)
        assert "eval_phi_mean" in b  # our statistics come on top of SFTTrainer's


def test_several_eval_datasets(tiny_tokenizer, tmp_path):
    rows = arithmetic_examples(8)
    evals = {"easy": Dataset.from_list(rows[:3]), "hard": Dataset.from_list(messages_rows(3))}
    sft, idft = pair(tiny_tokenizer, tmp_path, rows, eval_rows=evals)
    for name in evals:
        a = sft.evaluate(metric_key_prefix=f"eval_{name}", eval_dataset=sft.eval_dataset[name])
        b = idft.evaluate(metric_key_prefix=f"eval_{name}", eval_dataset=idft.eval_dataset[name])
        assert b[f"eval_{name}_loss"] == pytest.approx(a[f"eval_{name}_loss"], abs=1e-5)


def test_text_data_with_formatting_func(tiny_tokenizer, tmp_path):
    rows = [{"question": r["prompt"], "answer": r["completion"]} for r in arithmetic_examples(6, conversational=False)]
    sft, idft = pair(tiny_tokenizer, tmp_path, rows, formatting_func=lambda ex: f"Q: {ex['question']}A: {ex['answer']}")
    assert_same_data_and_loss(sft, idft)
    assert tiny_tokenizer.decode(idft.train_dataset[0]["input_ids"]).startswith("Q: What is")


def test_pretokenized_data(tiny_tokenizer, tmp_path):
    rows = [{"input_ids": tiny_tokenizer(f"{i} + {i} = {2 * i}")["input_ids"]} for i in range(6)]
    sft, idft = pair(tiny_tokenizer, tmp_path, rows)
    assert_same_data_and_loss(sft, idft)


@pytest.mark.parametrize("mode", ["keep_start", "keep_end"])
def test_truncation(tiny_tokenizer, tmp_path, mode):
    sft, idft = pair(tiny_tokenizer, tmp_path, messages_rows(), max_length=24, truncation_mode=mode)
    assert_same_data_and_loss(sft, idft)
    assert max(len(x) for x in idft.train_dataset["input_ids"]) == 24


@pytest.mark.parametrize("kind", ["TrainingArguments", "SFTConfig"])
def test_training_arguments_are_converted(tiny_tokenizer, tmp_path, kind):
    """SFTTrainer converts a TrainingArguments to SFTConfig; IDFTTrainer converts it (and an SFTConfig) to IDFTConfig,
    carrying every field over, with a one-line warning."""
    kw = dict(output_dir=str(tmp_path / "out"), learning_rate=3e-3, weight_decay=0.05, seed=7, use_cpu=True,
              bf16=False, report_to="none", max_steps=1, per_device_train_batch_size=2)
    args = TrainingArguments(**kw) if kind == "TrainingArguments" else SFTConfig(**kw, max_length=48)
    model, _ = make_tiny_model(tiny_tokenizer)
    with pytest.warns(UserWarning, match=f"converted the {kind} to an IDFTConfig") as record:
        trainer = IDFTTrainer(model, args, train_dataset=Dataset.from_list(arithmetic_examples(4)),
                              processing_class=tiny_tokenizer)
    ours = [str(w.message) for w in record if "converted the" in str(w.message)]
    assert len(ours) == 1 and "\n" not in ours[0]
    assert isinstance(trainer.args, IDFTConfig) and trainer.args.token_loss == "idft"
    for key in ("learning_rate", "weight_decay", "seed", "max_steps", "per_device_train_batch_size", "output_dir"):
        assert getattr(trainer.args, key) == kw[key], key
    # the same conversion SFTTrainer makes: every SFTConfig field it produces is what ours has
    model2, _ = make_tiny_model(tiny_tokenizer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sft = SFTTrainer(model2, copy.deepcopy(args), train_dataset=Dataset.from_list(arithmetic_examples(4)),
                         processing_class=tiny_tokenizer)
    theirs = sft.args.to_dict()
    mine = trainer.args.to_dict()
    assert {k: v for k, v in mine.items() if k in theirs and k != "hub_token"} == {
        k: v for k, v in theirs.items() if k != "hub_token"}
    if kind == "SFTConfig":
        assert trainer.args.max_length == 48


def test_sftconfig_loss_type_dft_swaps_in_unchanged(tiny_tokenizer, tmp_path):
    """A DFT user changes only the trainer class: SFTConfig(loss_type='dft') trains DFT, with SFTTrainer's loss."""
    rows = arithmetic_examples(6)
    args = SFTConfig(output_dir=str(tmp_path / "dft"), loss_type="dft", **BASE)
    losses = []
    for cls in (SFTTrainer, IDFTTrainer):
        model, _ = make_tiny_model(tiny_tokenizer)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t = cls(model, copy.deepcopy(args), train_dataset=Dataset.from_list(rows), processing_class=tiny_tokenizer)
        losses.append(batch_loss(t, first_batch(t)))
    assert t.args.token_loss == "dft"
    assert losses[1] == pytest.approx(losses[0], abs=1e-6)


def test_positional_arguments_in_sft_trainer_order(tiny_tokenizer, tmp_path):
    """model, args, data_collator, train_dataset, eval_dataset, processing_class, ... bind as in SFTTrainer."""
    model, _ = make_tiny_model(tiny_tokenizer)
    ds = Dataset.from_list(arithmetic_examples(4))
    args = IDFTConfig(output_dir=str(tmp_path / "pos"), **BASE)
    trainer = IDFTTrainer(model, args, None, ds, ds, tiny_tokenizer)
    assert trainer.processing_class is tiny_tokenizer and trainer.eval_dataset is not None


@pytest.mark.parametrize("token_loss", ["idft", "dft"])
def test_model_card_has_citation_and_tags(tiny_tokenizer, tmp_path, token_loss):
    """As TRL trainers do: `_tag_names` go on the model and the card, `_paper` gives the card its citation."""
    model, _ = make_tiny_model(tiny_tokenizer)
    out = tmp_path / "card"
    trainer = IDFTTrainer(model, IDFTConfig(output_dir=str(out), token_loss=token_loss, **BASE),
                          train_dataset=Dataset.from_list(arithmetic_examples(4)), processing_class=tiny_tokenizer)
    trainer.create_model_card(model_name="tiny-idft")
    card = (out / "README.md").read_text()
    for tag in ("trl", "sft", "trl-onpolicy", token_loss):
        assert f"- {tag}\n" in card, tag
        assert tag in trainer.model.model_tags
    assert "@article{zhang2026onpolicysft" in card and "2602.12222" in card
    assert "IDFT" in card and "Towards On-Policy SFT" in card


def test_model_card_of_online_training_is_tagged(tiny_tokenizer, tmp_path):
    from conftest import word_problem_rows

    from trl_onpolicy import HintedDataCollator

    model, _ = make_tiny_model(tiny_tokenizer)
    out = tmp_path / "card"
    trainer = IDFTTrainer(model, IDFTConfig(output_dir=str(out), **BASE),
                          train_dataset=Dataset.from_list(word_problem_rows(4)), processing_class=tiny_tokenizer,
                          data_collator=HintedDataCollator(tiny_tokenizer))
    trainer.create_model_card(model_name="tiny-online")
    card = (out / "README.md").read_text()
    assert "- hinted-decoding\n" in card and "- idft\n" in card and "@article{zhang2026onpolicysft" in card


# ------------------------------------------------------------------- the other token losses against references


@pytest.mark.parametrize("setting", [dict(token_loss="dft"),
                                     dict(token_loss="idft", idft_gamma_min=1.0, idft_gamma_max=1.0),
                                     dict(token_loss="idft", idft_warmup_ratio=1.0)],
                         ids=["dft", "idft-gamma-pinned-to-1", "idft-in-warmup"])
@pytest.mark.parametrize("rows", ["prompt-completion", "messages"])
def test_dft_and_idft_at_gamma_1_match_trl_dft(tiny_tokenizer, tmp_path, setting, rows):
    """TRL's own DFT (``SFTConfig(loss_type="dft")``: loss -sg(p) log p) is an independent reference for our DFT and for
    IDFT whenever gamma is 1 (both clamps at 1, or the schedule still in its warm-up, lambda = 0)."""
    data = arithmetic_examples(6) if rows == "prompt-completion" else messages_rows()
    trainers = []
    for cls, args in ((SFTTrainer, SFTConfig(output_dir=str(tmp_path / "sft"), loss_type="dft", **BASE)),
                      (IDFTTrainer, IDFTConfig(output_dir=str(tmp_path / "idft"), **BASE, **setting))):
        model, _ = make_tiny_model(tiny_tokenizer)  # the same weights for both (fixed seed)
        trainers.append(cls(model, args=args, train_dataset=Dataset.from_list(data), processing_class=tiny_tokenizer))
    sft, idft = trainers
    idft.state.max_steps, idft.state.global_step = 4, 0  # a known schedule position: progress 0
    if setting.get("idft_warmup_ratio"):
        assert idft.idft_lambda() == 0.0
    a, b = first_batch(sft), first_batch(idft)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert batch_loss(idft, b) == pytest.approx(batch_loss(sft, a), rel=1e-6)


def _float64_token_loss(tokenizer, model, batch, setting: dict, lam: float):
    """The loss of ``setting`` recomputed naively in float64 from full logits: per target token log p, entropy H,
    phi = log p + H, and the weight of the token loss (no fused head, no tiling, no helper of the package). The
    reference is a fresh model holding ``model``'s weights (the trainer patches its own model's forward)."""
    ref, _ = make_tiny_model(tokenizer)
    ref.load_state_dict(model.state_dict())
    ref.double().train()
    logits = ref(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits[:, :-1]
    targets = batch["labels"][:, 1:]
    mask = targets != -100
    log_softmax = torch.log_softmax(logits, dim=-1)
    logp = log_softmax.gather(-1, targets.clamp(min=0)[..., None])[..., 0][mask]
    probs = log_softmax.exp()
    entropy = -(probs * log_softmax).sum(-1)[mask]
    kind = setting["token_loss"]
    if kind == "idft":
        phi = (logp + entropy).detach()
        g = torch.exp(-phi / setting.get("idft_beta", 1.0)).clamp(setting.get("idft_gamma_min", 0.1),
                                                                  setting.get("idft_gamma_max", 2.0))
        gamma = 1.0 + lam * (g - 1.0)
        weight = torch.exp(gamma * logp)  # p ** gamma
        if setting.get("idft_detach", "weight") == "weight":
            weight = weight.detach()
        stats = {"gamma": g}
    else:  # eaft: entropy over the whole vocabulary or over the k largest logits, over the log of the class count
        if setting.get("eaft_entropy") == "full":
            h, classes = entropy, logits.shape[-1]
        else:
            k = setting["eaft_top_k"]
            top = torch.log_softmax(logits.topk(k, dim=-1).values, dim=-1)
            h, classes = -(top.exp() * top).sum(-1)[mask], k
        weight = (h / math.log(classes)).detach()
        stats = {}
    loss = -(weight * logp).sum() / mask.sum()
    loss.backward()
    grads = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    return loss.item(), grads, stats


FIT_STEPS = 8


@pytest.mark.parametrize("setting, progress", [
    (dict(token_loss="idft", idft_beta=0.3), (0, 4)),
    (dict(token_loss="idft", idft_beta=0.5, idft_gamma_min=0.5, idft_gamma_max=1.5, idft_transition_ratio=0.5), (1, 4)),
    (dict(token_loss="idft", idft_beta=0.3, idft_detach="gamma"), (0, 4)),
    (dict(token_loss="eaft", eaft_entropy="full"), (0, 4)),
    (dict(token_loss="eaft", eaft_entropy="topk", eaft_top_k=5), (0, 4)),
], ids=["idft", "idft-mid-schedule", "idft-detach-gamma", "eaft-full", "eaft-top5"])
def test_idft_and_eaft_match_a_float64_recomputation(tiny_tokenizer, tmp_path, setting, progress):
    """IDFT and EAFT (no TRL reference exists): the trainer's loss and its gradient, from the fused LM head in float32,
    equal a naive float64 recomputation from full logits. The model first half-learns the batch (plain NLL steps), so
    that phi spreads to both sides of 0 and IDFT's clamps bind at both ends."""
    model, _ = make_tiny_model(tiny_tokenizer)
    args = IDFTConfig(output_dir=str(tmp_path / "run"), **{**BASE, **setting})
    trainer = IDFTTrainer(model, args=args, train_dataset=Dataset.from_list(arithmetic_examples(6)),
                          processing_class=tiny_tokenizer)
    trainer.state.global_step, trainer.state.max_steps = progress
    lam = trainer.idft_lambda() if setting["token_loss"] == "idft" else 1.0
    if "idft_transition_ratio" in setting:
        assert lam == 0.5  # progress 1/4 over a transition of half the run
    batch = first_batch(trainer, n=4)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(FIT_STEPS):
        optimizer.zero_grad()
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss.backward()
        optimizer.step()
    expected, expected_grads, stats = _float64_token_loss(tiny_tokenizer, trainer.model, batch, setting, lam)
    if setting["token_loss"] == "idft":  # the clamps are reached on both sides: the test covers them
        assert (stats["gamma"] == setting.get("idft_gamma_max", 2.0)).any()
        assert (stats["gamma"] == setting.get("idft_gamma_min", 0.1)).any()

    trainer.model.train()
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, dict(batch))
    loss.backward()
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    grads = {n: p.grad for n, p in trainer.model.named_parameters() if p.grad is not None}
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad.double(), expected_grads[name], rtol=1e-4, atol=1e-6, msg=name)
