"""Launchable wrapper of `trl-onpolicy train` (for `accelerate launch` / `torchrun`); see trl_onpolicy/cli/train.py.

    accelerate launch --config_file recipes/accelerate/multi_gpu.yaml scripts/train.py --config RECIPE.yaml [--key value ...]
"""

import sys

from trl_onpolicy.cli.train import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
