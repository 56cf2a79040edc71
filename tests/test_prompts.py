"""THE prompt renderer (`trl_onpolicy.data.prompts.render_prompt_ids`) against TRL's own SFTTrainer tokenization of
prompt-completion rows, and evaluation's prompts (`encode_prompts`) against the text route they used to take."""

import copy
import json
from pathlib import Path

import pytest
import yaml

from trl_onpolicy.data.prompts import render_prompt_ids

REPO = Path(__file__).resolve().parents[1]
STYLE_PREFIX = "{%- if style is defined %}{{- '<|im_start|>system\\nStyle: ' + style + '<|im_end|>\\n' }}{%- endif %}"
TOOLS = [{"type": "function", "function": {"name": "add", "description": "Add two integers.", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}}]


def _trl_prompt_ids(tokenizer, rows, tmp_path):
    """The prompt ids of each prompt-completion row as SFTTrainer prepares it: the tokens before the first trained
    label (completion-only loss), read from the trainer's own prepared dataset."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from trl_onpolicy.testing.tiny import make_tiny_model

    model, _ = make_tiny_model(tokenizer)
    args = SFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to=[], max_length=None,
                     completion_only_loss=True, dataset_num_proc=None)
    trainer = SFTTrainer(model, args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    out = []
    for row in trainer.train_dataset:
        first = next(i for i, label in enumerate(row["labels"]) if label != -100)
        out.append(list(row["input_ids"][:first]))
    return out, trainer.chat_template


def test_conversational_prompts_with_system_turn_tools_and_template_kwargs_match_sft_trainer(tiny_tokenizer, tmp_path):
    tok = copy.copy(tiny_tokenizer)
    tok.chat_template = STYLE_PREFIX + tiny_tokenizer.chat_template  # a template that reads a chat_template_kwarg
    rows = []
    for i in range(3):
        system = [{"role": "system", "content": f"You are tutor number {i}."}] if i != 1 else []
        rows.append({
            "prompt": system + [{"role": "user", "content": f"What is {i} + 4?"}],
            "completion": [{"role": "assistant", "content": f"{i} + 4 = {i + 4}."}],
            "tools": json.dumps(TOOLS) if i != 2 else None,  # a JSON string, as TRL's datasets store tools
            "chat_template_kwargs": {"style": f"terse-{i}"},
        })
    want, template = _trl_prompt_ids(tok, rows, tmp_path)
    got = [render_prompt_ids(tok, row["prompt"], chat_template=template, example=row) for row in rows]
    assert got == want
    texts = [tok.decode(ids) for ids in got]
    assert "You are tutor number 0." in texts[0] and "Style: terse-1" in texts[1] and '"name": "add"' in texts[0]
    assert '"name": "add"' not in texts[2]
    # the row matters: without its tools and kwargs the ids are not SFTTrainer's
    assert render_prompt_ids(tok, rows[0]["prompt"]) != want[0]


def test_text_prompts_match_sft_trainer(tiny_tokenizer, tmp_path):
    rows = [{"prompt": f"Question: what is {i} + 4?\nAnswer:", "completion": f" {i + 4}"} for i in range(3)]
    want, template = _trl_prompt_ids(tiny_tokenizer, rows, tmp_path)
    assert [render_prompt_ids(tiny_tokenizer, r["prompt"], chat_template=template) for r in rows] == want


def test_bad_prompts_are_refused_in_one_line(tiny_tokenizer):
    with pytest.raises(ValueError, match="string or a list of chat messages"):
        render_prompt_ids(tiny_tokenizer, 42)
    plain = copy.copy(tiny_tokenizer)
    plain.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        render_prompt_ids(plain, [{"role": "user", "content": "hi"}])


def _study_prompts() -> dict[str, list]:
    """The prompts the SmolLM2 study evaluates and measures forgetting on (recipes/compare/smollm2_study.yaml): its
    evaluation sets, the held-out in-domain KL prompts and the general KL prompts."""
    from trl_onpolicy.eval.evaluation import EvalSet, load_eval_set

    recipe = yaml.safe_load((REPO / "recipes" / "compare" / "smollm2_study.yaml").read_text())
    sets = {s["name"]: [r["prompt"] for r in load_eval_set(EvalSet.from_spec(dict(s)))] for s in recipe["eval"]["sets"]}
    data, metrics = recipe["data"], recipe["metrics"]
    kl = EvalSet.from_spec({"name": "kl_in_domain", "task": data["task"], "n": metrics["kl_n"], "seed": 20_000,
                            "task_kwargs": data["task_kwargs"]})
    sets["kl_in_domain"] = [r["prompt"] for r in load_eval_set(kl)]
    general = [json.loads(line)["prompt"] for line in
               (REPO / "trl_onpolicy" / "eval" / "resources" / "general_prompts.jsonl").read_text().splitlines() if line.strip()]
    sets["general"] = [[{"role": "user", "content": p}] if isinstance(p, str) else p for p in general[: metrics["general_n"]]]
    return sets


def _study_training_rows(n: int = 64) -> list[dict]:
    from trl_onpolicy.data.datasets import math_word_problems

    data = yaml.safe_load((REPO / "recipes" / "compare" / "smollm2_study.yaml").read_text())["data"]
    return list(math_word_problems(n, seed=data["seed"], task=data["task"], **data["task_kwargs"]))


@pytest.mark.parametrize("which", ["tiny", "smollm2"])
def test_study_prompts_keep_their_token_ids(tiny_tokenizer, which, request):
    """Evaluation and the forgetting measures now render through the one renderer; the ids of the study's prompts are
    those of the route they took before (chat template to text, then the tokenizer without special tokens)."""
    from trl_onpolicy.eval.evaluation import encode_prompts

    tok = tiny_tokenizer if which == "tiny" else request.getfixturevalue("smollm2_tokenizer")
    sets = _study_prompts()
    assert sum(len(p) for p in sets.values()) > 400
    def old_route(messages):
        return tok(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                   add_special_tokens=False)["input_ids"]

    for name, prompts in sets.items():
        assert encode_prompts(tok, prompts) == [old_route(p) for p in prompts], name
    # Hinted Decoding's two prompts of the study's training rows (offline corpus and online mode) did the same
    from trl_onpolicy.hinted.prompts import build_hinted_prompt_ids, hinted_messages, plain_prompt

    rows = _study_training_rows()
    questions, references = [r["question"] for r in rows], [r["solution"] for r in rows]
    hinted, _ = build_hinted_prompt_ids(None, tok, questions, references)
    assert hinted == [old_route(hinted_messages(q, r)) for q, r in zip(questions, references)]
    assert [render_prompt_ids(tok, plain_prompt(r), example=r) for r in rows] == [old_route(r["prompt"]) for r in rows]
