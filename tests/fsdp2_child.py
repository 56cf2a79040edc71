"""Child process of tests/test_fsdp2.py: one optimizer step of IDFTTrainer under FSDP2, 2 CPU processes over gloo.

Usage: ``accelerate launch --config_file recipes/accelerate/cpu_fsdp2_2proc.yaml tests/fsdp2_child.py MODEL_DIR
SFT_JSONL ONLINE_JSONL OUT_DIR``. For every token loss (`LOSSES`) and for online mode (Hinted Decoding with
``compute_phi``), it trains one SGD step from the saved model and writes, on rank 0, ``OUT_DIR/<name>.safetensors``
(the updated weights, gathered from the shards) and ``OUT_DIR/<name>.json`` (the logged first step). The parent
compares them with single-process runs. Not collected by pytest (no ``test_`` prefix).

accelerate offers FSDP only on accelerators: on a CPU-only machine it labels a 2-process launch MULTI_CPU and ignores
the FSDP settings. `pretend_accelerator` relabels it MULTI_GPU, so accelerate takes its FSDP2 path; the device stays
the CPU and the backend gloo (fully_shard itself runs on CPU).
"""

import json
import sys

import torch
from datasets import Dataset
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

# settings of one step, shared with the parent's single-process references (per_device_train_batch_size is set there)
SETTINGS = dict(max_steps=1, optim="sgd", learning_rate=0.5, lr_scheduler_type="constant", max_grad_norm=0.0,
                gradient_checkpointing=False, use_cpu=True, bf16=False, report_to="none", save_strategy="no",
                max_length=64, seed=0, logging_steps=1, disable_tqdm=True, dataloader_num_workers=0)
# greedy decoding: the online samples do not depend on how the rows are split across processes
DECODE = dict(max_new_tokens=4, temperature=0.0, top_p=1.0, splitter=None, checker="none", on_reject="keep",
              compute_phi=True)
ONLINE = {"max_length": 256}  # the word problems' prompts are longer than 64 tiny-tokenizer tokens
LOSSES = {"nll": {}, "dft": {}, "idft": {}, "eaft_topk": {"token_loss": "eaft", "eaft_entropy": "topk", "eaft_top_k": 5}}


def pretend_accelerator() -> None:
    import accelerate.state as state
    from accelerate.utils import DistributedType

    real_init = state.PartialState.__init__

    def init(self, cpu=False, **kwargs):
        real_init(self, cpu=cpu, **kwargs)
        if self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.MULTI_GPU

    state.PartialState.__init__ = init


def one_step(model_dir, rows, out, name, *, online=False, per_device=2, **config):
    """Train one step; returns the trainer. Used by this child (FSDP2) and by the parent (single process)."""
    from trl_onpolicy import HintedDataCollator, IDFTConfig, IDFTTrainer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    args = IDFTConfig(output_dir=f"{out}/{name}", per_device_train_batch_size=per_device,
                      **{**SETTINGS, "token_loss": "idft", **config})
    collator = HintedDataCollator(tok, **DECODE) if online else None
    trainer = IDFTTrainer(model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                          data_collator=collator)
    trainer.train()
    return trainer


def full_state(model) -> dict:
    from trl_onpolicy.ops.lm_head import full_tensor

    # FSDP's activation checkpointing wraps each layer: drop the wrapper's name to get the model's own names
    return {n.replace("_checkpoint_wrapped_module.", ""): full_tensor(p.detach()).contiguous().clone()
            for n, p in model.named_parameters()}


def scored_phi(model, tokenizer) -> list[list[float]]:
    """phi of every token after the first of two fixed texts under ``model`` (`trl_onpolicy.ddt.score_token_ids`)."""
    from trl_onpolicy.ddt import score_token_ids

    seqs = [tokenizer("What is 2 + 3? 2 + 3 = 5.")["input_ids"], tokenizer("Tom has 4 apples.")["input_ids"]]
    arrays = score_token_ids(model, seqs, [[1] * len(s) for s in seqs], batch_size=2)
    return [a["phi"].tolist() for a in arrays]


def main() -> None:
    torch.set_num_threads(1)
    pretend_accelerator()
    from trl_onpolicy.utils.distributed import end_processes, exit_process

    model_dir, sft_file, online_file, out = sys.argv[1:5]
    sft = [json.loads(line) for line in open(sft_file)]
    online = [json.loads(line) for line in open(online_file)]
    runs = {name: (sft, False, config) for name, config in LOSSES.items()} | {"online": (online, True, ONLINE)}
    for name, (rows, is_online, config) in runs.items():
        trainer = one_step(model_dir, rows, out, name, online=is_online, **config)
        acc = trainer.accelerator
        plugin = acc.state.fsdp_plugin
        from torch.distributed.tensor import DTensor

        sharded = sum(isinstance(p, DTensor) for p in trainer.model.parameters())
        weights = full_state(trainer.model)  # every rank takes part in the gathers
        # DDT scoring of the trained model: backbone and head called directly, on parameters resharded by the step
        phi = scored_phi(trainer.model, trainer.processing_class)
        if acc.is_main_process:
            save_file(weights, f"{out}/{name}.safetensors")
            info = {"distributed_type": str(acc.distributed_type), "fsdp_version": getattr(plugin, "fsdp_version", None),
                    "activation_checkpointing": getattr(plugin, "activation_checkpointing", None),
                    "model_class": type(trainer.model).__name__, "dtensor_parameters": sharded,
                    "parameters": len(weights), "world": acc.num_processes,
                    "logged": trainer.state.log_history[0], "ddt_phi": phi}
            with open(f"{out}/{name}.json", "w") as fh:
                json.dump(info, fh)
        acc.wait_for_everyone()
    end_processes()
    exit_process(0)


if __name__ == "__main__":
    main()
