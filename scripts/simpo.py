"""Launchable wrapper of `trl-onpolicy simpo` (for `accelerate launch` / `torchrun`); see trl_onpolicy/scripts/simpo.py.

    accelerate launch --config_file recipes/accelerate/multi_gpu.yaml scripts/simpo.py --config RECIPE.yaml [--key value ...]
"""

import sys

from trl_onpolicy.scripts.simpo import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
