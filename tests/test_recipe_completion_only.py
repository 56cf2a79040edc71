"""Every shipped training recipe trains on the response only: each recipe under recipes/ that `trl-onpolicy
train|dpo|simpo` runs is loaded with a tiny stand-in model and a small conversational dataset shaped like its own
(system + user + assistant turns), its data is prepared exactly as the command prepares it (`prepare`), the trainer is
built, and no system/user token carries a label while every assistant token does."""

import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SYSTEM = "You are a careful math tutor: reason step by step and put the final answer within \\boxed{}."
_COMMAND = re.compile(r"(?:scripts/|trl-onpolicy )(train|dpo|simpo)\b")


def _command(path: Path) -> str | None:
    header = "\n".join(line for line in path.read_text().splitlines() if line.startswith("#"))
    found = _COMMAND.search(header)
    return found.group(1) if found else None


RECIPES = sorted(p for p in (REPO / "recipes").rglob("*.yaml") if "accelerate" not in p.parts and _command(p))


def _turns(i):
    question = f"Tom has {i + 3} apples and buys {2 * i + 5} more. How many apples does he have now?"
    answer = f"He has {i + 3} + {2 * i + 5} = {3 * i + 8} apples, so the answer is \\boxed{{{3 * i + 8}}}."
    prompt = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    return prompt, [{"role": "assistant", "content": answer}]


def _dataset_like(recipe_text: str, command: str, n: int = 4) -> list[dict]:
    """Rows shaped like the recipe's own data, with a system prompt."""
    rows = []
    for i in range(n):
        prompt, completion = _turns(i)
        if command in ("dpo", "simpo"):  # `trl-onpolicy pairs` output
            wrong = [{"role": "assistant", "content": f"It is \\boxed{{{i}}}."}]
            rows.append({"prompt": prompt, "chosen": completion, "rejected": wrong})
        elif "NuminaMath" in recipe_text:  # source, problem, solution, messages
            rows.append({"source": "synthetic", "problem": prompt[1]["content"], "solution": completion[0]["content"],
                         "messages": prompt + completion})
        else:  # reasoning-gym generator / realign train.jsonl: conversational prompt-completion
            rows.append({"prompt": prompt, "completion": completion, "question": prompt[1]["content"],
                         "solution": completion[0]["content"], "answer": str(3 * i + 8)})
    return rows


def test_every_training_recipe_is_covered():
    names = {str(p.relative_to(REPO / "recipes")) for p in RECIPES}
    assert len(RECIPES) >= 15, names
    assert {"quickstart/cpu_idft.yaml", "qwen2.5-math-1.5b/idft.yaml", "qwen2.5-math-7b/simpo.yaml"} <= names
    # a recipe that trains (a top-level learning_rate) but names no command in its header would escape the test below
    trains = {str(p.relative_to(REPO / "recipes")) for p in (REPO / "recipes").rglob("*.yaml")
              if re.search(r"^learning_rate:", p.read_text(), re.M)}
    assert trains <= names, sorted(trains - names)


@pytest.mark.parametrize("recipe", RECIPES, ids=[str(p.relative_to(REPO / "recipes")) for p in RECIPES])
def test_recipe_trains_on_the_assistant_turn_only(recipe, tiny_model_dir, tmp_path):
    import importlib

    from transformers import AutoTokenizer

    command = _command(recipe)
    module = importlib.import_module(f"trl_onpolicy.cli.{command}")
    rows = _dataset_like(recipe.read_text(), command)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["--config", str(recipe), "--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(data),
            "--output_dir", str(tmp_path / "out"), "--use_cpu", "true", "--bf16", "false", "--report_to", "none"]
    prepared = module.prepare(argv)
    trainer = module.build_trainer(prepared["model_path"], prepared["training_args"], prepared["model_args"],
                                   prepared["script_args"], prepared["train"], prepared["evaluation"],
                                   *prepared["extra"])
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    train = trainer.train_dataset
    assert len(train) == len(rows)
    for k, row in enumerate(train):
        prompt, completion = _turns(k)
        prompt_ids = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        prompt_ids = tok(prompt_ids, add_special_tokens=False)["input_ids"]
        if "labels" in row or "chosen_labels" in row:  # SFT family; SimPO (CPOTrainer) labels chosen/rejected itself
            pairs = [("input_ids", "labels")] if "labels" in row else [("chosen_input_ids", "chosen_labels"),
                                                                        ("rejected_input_ids", "rejected_labels")]
            for ids_key, labels_key in pairs:
                ids, labels = list(row[ids_key]), list(row[labels_key])
                assert ids[: len(prompt_ids)] == prompt_ids
                # system and user tokens (and the assistant header) carry no label; every assistant token does
                assert all(lab == -100 for lab in labels[: len(prompt_ids)])
                assert all(lab == t for lab, t in zip(labels[len(prompt_ids):], ids[len(prompt_ids):]))
                assert len(ids) > len(prompt_ids)
            assert completion[0]["content"] in tok.decode(list(row[pairs[0][0]])[len(prompt_ids):])
            collator = getattr(trainer, "_hinted_collator", None)  # set for hinted_online recipes, as the command does
            if collator is not None:  # online recipes decode from the very prompt the step trains on
                assert collator.plain_prompt_ids(row) == prompt_ids
        else:  # DPOTrainer keeps the prompt apart and scores only chosen/rejected ids given it
            assert list(row["prompt_ids"]) == prompt_ids
            chosen = tok.decode(row["chosen_ids"])
            assert completion[0]["content"] in chosen and SYSTEM not in chosen and "Tom has" not in chosen
