"""Online Hinted Decoding on conversational language-modeling data (``messages`` rows: system + user + assistant):
a re-aligned sample keeps the whole conversation as its prompt (system and earlier turns) and SFTTrainer's loss mask
(assistant_only_loss), checked against TRL's own preparation of the same conversation with the new response."""

import pytest
import torch
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

import trl_onpolicy.hinted.decoding as hinted_module
from trl_onpolicy import HintedDataCollator, IDFTConfig
from trl_onpolicy.hinted.decoding import HintedResult
from trl_onpolicy.testing.tiny import make_tiny_model
from trl_onpolicy.trainer.idft_trainer import IDFTTrainer

SYSTEM = "You are a careful tutor. End with #### and the number."
NEW = "So {a} + {b} makes {c}. #### {c}"  # the re-aligned response (starts with a letter: no merge at the boundary)


def chat_rows(n: int = 4) -> list[dict]:
    rows = []
    for i in range(n):
        a, b = i + 1, 2 * i + 3
        q, s = f"Tom has {a} apples and buys {b} more. How many?", f"{a} + {b} = {a + b}. #### {a + b}"
        messages = [{"role": "system", "content": SYSTEM}]
        if i == 1:  # a multi-turn conversation: an earlier exchange stays in the prompt
            messages += [{"role": "user", "content": "Are you ready?"}, {"role": "assistant", "content": "Yes, ready."}]
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": s}]
        rows.append({"messages": messages, "question": q, "solution": s, "answer": str(a + b)})
    return rows


def new_text(row) -> str:
    a, b = [int(t) for t in row["question"].split() if t.isdigit()]
    return NEW.format(a=a, b=b, c=a + b)


def args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, gradient_accumulation_steps=1,
                max_steps=1, learning_rate=1e-3, use_cpu=True, bf16=False, gradient_checkpointing=False, report_to=[],
                logging_steps=1, save_strategy="no", seed=0, token_loss="idft", assistant_only_loss=True)
    base.update(kw)
    return IDFTConfig(**base)


class FakeDecode:
    """Stands in for `hinted_decode`: records the plain prompts it is given and answers every sample with the
    tokens of `new_text` (ended by EOS, so it is "eos"; or cut before EOS with ``finished=False``)."""

    def __init__(self, tok, texts_by_question, finished=True):
        self.tok, self.texts, self.finished, self.plain, self.hinted = tok, texts_by_question, finished, [], []

    def response(self, plain) -> list[int]:
        text = next(t for q, t in self.texts.items() if q in self.tok.decode(plain))
        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        return ids + [self.tok.eos_token_id] if self.finished else ids

    def __call__(self, model, tokenizer, hinted, plain, **kwargs):
        self.plain += [list(p) for p in plain]
        self.hinted += [list(h) for h in hinted]
        return [HintedResult(token_ids=self.response(p), finish_reason="eos" if self.finished else "length",
                             lambda_mean=0.5) for p in plain]


def unpadded(batch, i):
    keep = batch["attention_mask"][i].bool()
    return batch["input_ids"][i][keep].tolist(), batch["labels"][i][keep].tolist()


def trl_reference(tok, tmp_path, rows):
    """TRL's own preparation (SFTTrainer, assistant_only_loss=True) of each conversation with its last assistant turn
    replaced by the re-aligned response: (input_ids, labels) per row."""
    convs = [{"messages": r["messages"][:-1] + [{"role": "assistant", "content": new_text(r)}]} for r in rows]
    model, _ = make_tiny_model(tok)
    cfg = SFTConfig(output_dir=str(tmp_path / "ref"), use_cpu=True, bf16=False, report_to=[], assistant_only_loss=True)
    prepared = SFTTrainer(model, cfg, train_dataset=Dataset.from_list(convs), processing_class=tok).train_dataset
    return [(list(x["input_ids"]), list(x["labels"])) for x in prepared]


def make_trainer(tiny_model, tmp_path, monkeypatch, rows, *, checker, on_reject="reference", finished=True):
    model, tok = tiny_model
    fake = FakeDecode(tok, {r["question"]: new_text(r) for r in rows}, finished=finished)
    monkeypatch.setattr(hinted_module, "hinted_decode", fake)
    collator = HintedDataCollator(tok, max_new_tokens=8, splitter=None, checker=checker, on_reject=on_reject,
                                  compute_phi=False)
    trainer = IDFTTrainer(model, args=args(tmp_path), train_dataset=Dataset.from_list(rows), processing_class=tok,
                          data_collator=collator)
    return trainer, fake


def test_accepted_chat_samples_keep_the_conversation_prompt_and_trls_assistant_mask(tiny_model, tmp_path, monkeypatch):
    model, tok = tiny_model
    rows = chat_rows()
    trainer, fake = make_trainer(tiny_model, tmp_path, monkeypatch, rows, checker=lambda extracted, gold: True)
    collator = trainer.data_collator
    assert collator.assistant_only_loss is True  # filled from the trainer's args
    examples = [trainer.train_dataset[i] for i in range(len(rows))]
    (new,), stats = collator.realign(model, [collator(examples)], seed=0)
    assert stats["accepted"] == len(rows)

    reference = trl_reference(tok, tmp_path, rows)
    newline = tok("\n", add_special_tokens=False)["input_ids"]
    for i, row in enumerate(rows):
        plain = fake.plain[i]
        text = tok.decode(plain)
        assert SYSTEM in text and row["question"] in text  # the decoded plain prompt holds the system turn
        assert ("Yes, ready." in text) == (i == 1)  # and the earlier turns
        # the hinted stream sees the same conversation, its last user turn replaced by the hint with the reference
        hinted_text = tok.decode(fake.hinted[i])
        assert SYSTEM in hinted_text and row["solution"] in hinted_text and row["question"] in hinted_text
        assert ("Yes, ready." in hinted_text) == (i == 1)
        assert hinted_text.count("<|im_start|>user") == (2 if i == 1 else 1)
        assert plain == list(examples[i]["input_ids"][: len(plain)])  # the prompt SFTTrainer trains the turn after
        ids, labels = unpadded(new, i)
        response = fake.response(plain)
        assert ids == plain + response
        assert labels[len(plain):] == response  # the new response is trained, EOS included
        # every token of the system and user turns is left out of the loss
        system_end = text.index(SYSTEM) + len(SYSTEM)
        upto = next(k for k in range(len(plain)) if len(tok.decode(plain[:k])) >= system_end)
        assert set(labels[:upto]) == {-100}
        user_turn = tok(f"<|im_start|>user\n{row['question']}<|im_end|>", add_special_tokens=False)["input_ids"]
        start = next(k for k in range(len(plain)) if plain[k : k + len(user_turn)] == user_turn)
        assert set(labels[start : start + len(user_turn)]) == {-100}
        # independent reference: TRL's own mask of the same conversation with the new response; TRL's sequence
        # also holds the template's newline after the end of the turn, which a generated response stops before
        want_ids, want_labels = reference[i]
        assert want_ids == ids + newline
        assert want_labels[: len(ids)] == labels
    # the earlier assistant turn of the multi-turn row is trained, as SFTTrainer's assistant mask says
    ids, labels = unpadded(new, 1)
    assert any(lab != -100 for lab in labels[: len(fake.plain[1]) - 1])

    # the training loop (get_batch_samples) trains exactly these sequences and labels
    seen = []
    real = trainer.compute_loss

    def compute_loss(model, inputs, return_outputs=False, num_items_in_batch=None):
        seen.append({k: inputs[k].clone() for k in ("input_ids", "labels", "attention_mask")})
        return real(model, inputs, return_outputs, num_items_in_batch)

    trainer.compute_loss = compute_loss
    trainer.train()
    (trained,) = seen
    as_set = lambda batch: sorted(map(str, (unpadded(batch, i) for i in range(len(rows)))))  # noqa: E731 (shuffled)
    assert as_set(trained) == as_set(new)


@pytest.mark.parametrize("on_reject", ["reference", "keep"])
def test_rejected_chat_samples(tiny_model, tmp_path, monkeypatch, on_reject):
    """A rejected response: with on_reject="reference" the sample is the reference conversation exactly as
    SFTTrainer prepared it; with "keep" the unfinished response is trained under the same mask as an accepted one."""
    model, tok = tiny_model
    rows = chat_rows()
    trainer, fake = make_trainer(tiny_model, tmp_path, monkeypatch, rows, checker=lambda extracted, gold: True,
                                 on_reject=on_reject, finished=False)
    collator = trainer.data_collator
    examples = [trainer.train_dataset[i] for i in range(len(rows))]
    (new,), stats = collator.realign(model, [collator(examples)], seed=0)
    assert stats["accepted"] == 0  # no EOS: unfinished
    reference = trl_reference(tok, tmp_path, rows)
    for i, ex in enumerate(examples):
        ids, labels = unpadded(new, i)
        if on_reject == "reference":
            assert (ids, labels) == (list(ex["input_ids"]), list(ex["labels"]))
        else:
            plain, response = fake.plain[i], fake.response(fake.plain[i])
            assert ids == plain + response and labels[len(plain):] == response
            want_ids, want_labels = reference[i]
            assert want_ids[: len(ids)] == ids and want_labels[: len(ids)] == labels


def test_prompt_column_data_is_unchanged(tiny_model, tmp_path, monkeypatch):
    """Prompt-completion rows (completion-only loss): the prompt stays out of the loss, the response is trained."""
    from conftest import word_problem_rows

    model, tok = tiny_model
    rows = word_problem_rows(4)
    fake = FakeDecode(tok, {r["question"]: "So it is 5. #### 5" for r in rows})
    monkeypatch.setattr(hinted_module, "hinted_decode", fake)
    trainer = IDFTTrainer(model, args=args(tmp_path, assistant_only_loss=False), train_dataset=Dataset.from_list(rows),
                          processing_class=tok,
                          data_collator=HintedDataCollator(tok, max_new_tokens=8, splitter=None, checker="none",
                                                           compute_phi=False))
    collator = trainer.data_collator
    (new,), stats = collator.realign(model, [collator([trainer.train_dataset[i] for i in range(4)])], seed=0)
    assert stats["accepted"] == 4
    for i in range(4):
        ids, labels = unpadded(new, i)
        plain = fake.plain[i]
        assert labels == [-100] * len(plain) + ids[len(plain):]
    assert torch.equal(new["attention_mask"].sum(-1), torch.tensor([len(p) + len(fake.response(p)) for p in fake.plain]))


def test_realigned_labels_where_the_prompt_leaves_the_reference():
    """A prompt whose end differs from the reference (a template that renders the prompt alone differently, or a
    truncated reference): only the shared tokens take the reference's labels, the rest of the prompt is masked unless
    every token is trained."""
    from trl_onpolicy.trainer.online import realigned_labels

    prompt, response = [1, 2, 3, 9], [20, 21]
    reference_ids, reference_labels = [1, 2, 3, 4, 5], [-100, -100, 3, 4, 5]
    assert realigned_labels(prompt, response, reference_ids, reference_labels, trains_every_token=False) == \
        [-100, -100, 3, -100, 20, 21]
    assert realigned_labels(prompt, response, reference_ids, reference_labels, trains_every_token=True) == \
        [-100, -100, 3, 9, 20, 21]
    assert realigned_labels(prompt, response, [1, 2], [1, 2], trains_every_token=False) == [1, 2, -100, -100, 20, 21]


def test_plain_prompt_of_each_row_format():
    from trl_onpolicy.hinted.prompts import plain_prompt

    chat = chat_rows(2)[1]  # system, earlier exchange, user, assistant
    assert plain_prompt(chat) == chat["messages"][:-1]
    assert plain_prompt({**chat, "prompt": "Q: 1 + 1?"}) == "Q: 1 + 1?"  # a prompt column comes first
    no_assistant = {"messages": [{"role": "user", "content": "hi"}], "question": "What is 2 + 2?"}
    assert plain_prompt(no_assistant, system_prompt="Be brief.") == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"}]
