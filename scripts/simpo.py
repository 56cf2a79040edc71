"""Launchable wrapper of `trl-onpolicy simpo` (for `accelerate launch` / `torchrun`); see trl_onpolicy/cli/simpo.py.

    accelerate launch --config_file recipes/accelerate/multi_gpu.yaml scripts/simpo.py --config RECIPE.yaml [--key value ...]
"""

import sys

from trl_onpolicy.cli.simpo import main
from trl_onpolicy.utils.distributed import exit_process

if __name__ == "__main__":
    exit_process(main(sys.argv[1:]))  # a rank of a multi-process launch skips finalization (see there)
