"""Data-parallel plumbing shared by the dataset jobs (`ddt`, `realign`) and the test/child scripts.

Under `torchrun` or `accelerate launch` with N processes, each job works on the rows ``rank, rank + N, ...``,
gathers its records with `gather_objects`, and ends with `end_processes`. Outside a multi-process launch every
helper degrades to the single-process behaviour.

One subtlety makes this module necessary: accelerate's `PartialState()` on a machine without an accelerator stays
*single-process* (DistributedType.NO) even when launched with ``WORLD_SIZE=2``, unless it is created with
``cpu=True``; every process would then run the whole job. `process_state` always passes ``cpu`` from the machine.
"""

from __future__ import annotations

import os


def process_state():
    """accelerate's `PartialState`, created as a CPU (gloo) state when the machine has no accelerator."""
    from accelerate import PartialState

    from trl_onpolicy.utils.device import has_accelerator

    return PartialState(cpu=not has_accelerator())


def distributed_state():
    """The `PartialState` of a multi-process launch (torchrun / accelerate launch), else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    state = process_state()
    if state.num_processes <= 1:
        raise RuntimeError(
            f"WORLD_SIZE={os.environ['WORLD_SIZE']} but accelerate set up a single process "
            f"({state.distributed_type}); launch with `accelerate launch --config_file ...` or `torchrun`, or unset "
            "WORLD_SIZE for a single-process run."
        )
    return state


def num_processes() -> int:
    state = distributed_state()
    return 1 if state is None else state.num_processes


def is_main_process() -> bool:
    state = distributed_state()
    return state is None or state.is_main_process


def local_indices(n: int) -> list[int]:
    """The row indices this process handles out of ``n`` (strided across processes)."""
    state = distributed_state()
    if state is None:
        return list(range(n))
    return list(range(state.process_index, n, state.num_processes))


def gather_objects(items: list) -> list:
    """Concatenate every process's ``items`` (picklable objects) on every process."""
    state = distributed_state()
    if state is None:
        return items
    from accelerate.utils import gather_object

    return gather_object(items)


def barrier() -> None:
    state = distributed_state()
    if state is not None:
        state.wait_for_everyone()


def end_processes() -> None:
    """At the end of a data-parallel job: wait for every process, then destroy the process group, so that no rank
    exits while another still works (a rank that leaves early can abort its peer under gloo with "terminate called
    without an active exception")."""
    state = distributed_state()
    if state is not None:
        state.wait_for_everyone()
        state.destroy_process_group()


def exit_process(code: int | None = 0):
    """Leave a launched script with exit status ``code``. In one process of a multi-process launch (``WORLD_SIZE`` >
    1), after its teardown (`end_processes` / ``trainer.end()``), the interpreter is left without finalization
    (``os._exit`` after flushing output): DDP and DeepSpeed keep their gloo process groups alive past
    ``destroy_process_group`` (their worker threads are still running), and finalizing Python under those threads
    aborted a rank now and then ("terminate called without an active exception", exit -6). Elsewhere: ``sys.exit``."""
    import sys

    code = 0 if code is None else int(code)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        sys.exit(code)
    import logging

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken stream: nothing left to keep
            pass
    os._exit(code)
