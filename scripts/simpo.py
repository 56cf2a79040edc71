"""Launchable wrapper of `trl-onpolicy simpo` (for `accelerate launch` / `torchrun`); see trl_onpolicy/cli/simpo.py.

    accelerate launch --config_file recipes/accelerate/multi_gpu.yaml scripts/simpo.py --config RECIPE.yaml [--key value ...]
"""

import sys

from trl_onpolicy.cli.simpo import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
