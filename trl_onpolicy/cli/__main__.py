"""``python -m trl_onpolicy.cli <command> ...``: the `trl-onpolicy` command, for launchers that take a module
(``torchrun --nproc_per_node 8 -m trl_onpolicy.cli realign ...``, ``accelerate launch -m trl_onpolicy.cli ddt ...``).
Like scripts/*.py it leaves through `exit_process` (a rank of a multi-process launch skips interpreter finalization)."""

from trl_onpolicy.cli.commands import main
from trl_onpolicy.utils.distributed import exit_process

if __name__ == "__main__":
    exit_process(main())
