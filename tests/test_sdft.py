"""SDFT wrapper (trl_onpolicy.trainer.sdft) around TRL 1.16's experimental SDFTTrainer: the behaviour we rely on, pinned."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from trl_onpolicy.trainer.sdft import build_sdft_trainer, sdft_config, sdft_dataset, train_sdft

from conftest import word_problem_rows

SYSTEM = {"role": "system", "content": "You are a careful math tutor."}


def _rows(n):
    return [{**r, "prompt": [SYSTEM] + r["prompt"]} for r in word_problem_rows(n)]


class _Record(TrainerCallback):
    """Keeps what SDFTTrainer built for each batch (its own callback event)."""

    def __init__(self):
        self.batches = []

    def on_self_distillation_batch_prepared(self, args, state, control, **kw):
        self.batches.append({k: kw[k].detach().clone() for k in ("prompt_ids", "teacher_input_ids", "completion_ids")})


def test_two_sdft_steps_train_the_student_and_show_the_teacher_the_solution(tiny_model_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    start = copy.deepcopy(model.state_dict())
    rows = _rows(4)
    record = _Record()
    args = {"max_steps": 2, "per_device_train_batch_size": 2, "learning_rate": 1e-2, "max_completion_length": 6,
            "seed": 0}
    trainer = build_sdft_trainer(model, tok, rows, args, tmp_path / "sdft", callbacks=[record])
    assert trainer.args.num_generations == 1 and trainer.args.teacher_model_kind == "base"
    assert trainer.args.remove_unused_columns is False
    if not torch.cuda.is_available():
        assert trainer.args.bf16 is False  # TRL's bf16 default would refuse to start on a CPU-only machine
    trainer.train()

    changed = [k for k, v in trainer.model.state_dict().items() if not torch.equal(v, start[k])]
    assert changed, "two SDFT steps left every weight unchanged"
    # the teacher is the frozen starting model
    assert all(torch.equal(v, start[k]) for k, v in trainer.teacher_model.state_dict().items())

    assert len(record.batches) >= 1
    solutions = {r["solution"] for r in rows}
    for batch in record.batches:
        for p_ids, t_ids in zip(batch["prompt_ids"], batch["teacher_input_ids"]):
            student = tok.decode(p_ids, skip_special_tokens=True)
            teacher = tok.decode(t_ids, skip_special_tokens=True)
            shown = [s for s in solutions if s in teacher]
            assert len(shown) == 1, teacher  # the teacher sees its own problem's reference solution ...
            assert not any(s in student for s in solutions)  # ... the student does not
            assert SYSTEM["content"] in teacher and SYSTEM["content"] in student


def test_train_sdft_returns_the_trained_model(tiny_model_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    before = model.lm_head.weight.detach().clone()
    out = train_sdft(model, tok, _rows(2), {"max_steps": 1, "per_device_train_batch_size": 2, "learning_rate": 1e-2,
                                            "max_completion_length": 4}, tmp_path / "o")
    assert not out.training and not torch.equal(out.lm_head.weight, before)


def test_sdft_settings_and_bad_input(tmp_path, tiny_model):
    assert sdft_dataset([{"prompt": "q?", "completion": [{"role": "assistant", "content": "a #### 1"}]}])[0] == {
        "prompt": [{"role": "user", "content": "q?"}], "privileged_context": "a #### 1"}
    with pytest.raises(ValueError, match="must divide"):
        sdft_config(tmp_path, {"num_generations": 3, "per_device_train_batch_size": 4})
    with pytest.raises(ValueError, match="not SDFTConfig fields"):
        sdft_config(tmp_path, {"learning_rat": 1e-5})
    with pytest.raises(ValueError, match="reference solution"):
        sdft_dataset([{"prompt": "q?", "completion": ""}])
    model, tok = tiny_model  # built in memory: no folder to re-load the base teacher from
    with pytest.raises(ValueError, match="_name_or_path"):
        build_sdft_trainer(model, tok, _rows(2), {}, tmp_path)
