"""Launchable wrapper of `trl-onpolicy dpo` (for `accelerate launch` / `torchrun`); see trl_onpolicy/cli/dpo.py.

    accelerate launch --config_file recipes/accelerate/multi_gpu.yaml scripts/dpo.py --config RECIPE.yaml [--key value ...]
"""

import sys

from trl_onpolicy.cli.dpo import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
