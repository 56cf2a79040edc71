"""DDT scores exactly the tokens TRL trains: on datasets prepared by TRL's SFTTrainer itself (conversational, with a
system prompt; completion_only_loss and assistant_only_loss) the scored tokens are the labels != -100, and the
token-weighted mean phi equals the `phi_mean` that IDFTTrainer logs for the same model and batch."""

import numpy as np
import pytest
from datasets import Dataset

from trl_onpolicy import IDFTConfig
from trl_onpolicy.ddt import Encoder, SkipSample, score_dataset
from trl_onpolicy.trainer.idft_trainer import IDFTTrainer

SYSTEM = "You are a careful math tutor. Reason step by step and end with the final answer in a box."


def _rows(n=4):
    rows = []
    for i in range(n):
        a, b = i + 3, 2 * i + 5
        rows.append({
            "prompt": [{"role": "system", "content": SYSTEM},
                       {"role": "user", "content": f"Tom has {a} apples and buys {b} more. How many now?"}],
            "completion": [{"role": "assistant",
                            "content": f"He starts with {a} and adds {b}: {a} + {b} = {a + b}. So \\boxed{{{a + b}}}."}],
        })
    return rows


def _config(tmp_path, n, **kw):
    return IDFTConfig(output_dir=str(tmp_path / "run"), per_device_train_batch_size=n, max_steps=1, learning_rate=1e-3,
                      use_cpu=True, bf16=False, gradient_checkpointing=False, report_to=[], logging_steps=1,
                      save_strategy="no", seed=0, token_loss="idft", dataloader_num_workers=0, **kw)


@pytest.mark.parametrize("shape", ["prompt_completion", "messages_assistant_only"])
def test_ddt_scores_the_labels_trl_trains_and_matches_logged_phi(tiny_model, tmp_path, shape):
    model, tok = tiny_model
    rows = _rows()
    if shape == "prompt_completion":
        data, kw = Dataset.from_list(rows), {"completion_only_loss": True}
    else:  # TRL swaps in its {% generation %} training template for this (Qwen2.5) chat template
        data = Dataset.from_list([{"messages": r["prompt"] + r["completion"]} for r in rows])
        kw = {"assistant_only_loss": True}
    trainer = IDFTTrainer(model, args=_config(tmp_path, len(rows), **kw), train_dataset=data, processing_class=tok)
    prepared = trainer.train_dataset
    assert "labels" in prepared.column_names

    result = score_dataset(model, tok, prepared, max_length=None, progress=False)
    assert all(s["skipped"] is None for s in result.samples)
    phi = np.concatenate([t["phi"] for t in result.tokens]).astype(np.float64)
    trained = sum(sum(1 for lab in row["labels"][1:] if lab != -100) for row in prepared)
    assert len(phi) == trained
    # no system or user token is scored: every scored token lies after the last "assistant" header
    for row, tokens in zip(prepared, result.tokens):
        first = next(i for i, lab in enumerate(row["labels"]) if lab != -100)
        assert SYSTEM not in tok.decode(row["input_ids"][first:])
        assert tok.decode(row["input_ids"][:first]).rstrip().endswith("assistant")

    trainer.train()  # one step; its forward runs on the weights DDT just scored
    logged = next(h for h in trainer.state.log_history if "phi_mean" in h)
    assert logged["phi_mean"] == pytest.approx(phi.mean(), abs=1e-5)


def test_pretokenized_masks_are_honoured(tiny_tokenizer):
    enc = Encoder(tiny_tokenizer, "input_ids")
    ids = [5, 6, 7, 8, 9, 10]
    # labels win over everything else (-100 = not trained)
    row = {"input_ids": ids, "labels": [-100, -100, 7, 8, -100, 10], "completion_mask": [1] * 6}
    assert enc(row) == (ids, [0, 0, 1, 1, 0, 1])
    # without labels: assistant_masks and completion_mask both apply, as SFTTrainer combines them
    row = {"input_ids": ids, "assistant_masks": [0, 0, 1, 1, 1, 1], "completion_mask": [0, 1, 1, 1, 1, 0]}
    assert enc(row) == (ids, [0, 0, 1, 1, 1, 0])
    assert enc({"input_ids": ids, "assistant_masks": [0, 0, 0, 1, 1, 1]})[1] == [0, 0, 0, 1, 1, 1]
    assert enc.prompt_ids({"input_ids": ids, "labels": [-100, -100, -100, 8, 9, 10]}) == [5, 6, 7]
    with pytest.raises(SkipSample, match="empty_completion"):
        enc({"input_ids": ids, "labels": [-100] * 6})
    with pytest.raises(SkipSample, match="not shifted"):
        enc({"input_ids": ids, "labels": ids[1:] + [-100]})
