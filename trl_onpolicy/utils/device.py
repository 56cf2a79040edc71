"""What the machine has: an accelerator or not, and the mixed-precision default that follows."""

from __future__ import annotations

import torch


def has_accelerator() -> bool:
    """Whether torch sees a CUDA (or other) accelerator."""
    if torch.cuda.is_available():
        return True
    for name in ("xpu", "npu", "mlu", "musa", "hpu"):
        backend = getattr(torch, name, None)
        if backend is not None and getattr(backend, "is_available", lambda: False)():
            return True
    return False


def default_bf16_for_machine(args) -> None:
    """TRL's configs default to bf16 mixed precision, which refuses to start on a machine without an accelerator:
    resolve an unset ``bf16`` to False there (and with ``use_cpu``). Call before the config's own ``__post_init__``."""
    if args.bf16 is None and not args.fp16 and (args.use_cpu or not has_accelerator()):
        args.bf16 = False
