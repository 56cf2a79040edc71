"""Launchable wrapper of `trl-onpolicy dpo` (for `accelerate launch` / `torchrun`); see trl_onpolicy/cli/dpo.py.

    accelerate launch --config_file recipes/accelerate/multi_gpu.yaml scripts/dpo.py --config RECIPE.yaml [--key value ...]
"""

import sys

from trl_onpolicy.cli.dpo import main
from trl_onpolicy.utils.distributed import exit_process

if __name__ == "__main__":
    exit_process(main(sys.argv[1:]))  # a rank of a multi-process launch skips finalization (see there)
