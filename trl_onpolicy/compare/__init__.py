"""`trl-onpolicy compare`: train and evaluate several methods on the same data, budget and seeds.

The recipe (`config`), the units and their resume rules (`units`), the method registry (`methods`), the metrics
(`metrics`), the orchestration (`runner`), the report (`report`) and the command (`cli`).
"""

from trl_onpolicy.compare.cli import main
from trl_onpolicy.compare.config import (
    Budget,
    CompareConfig,
    DataSpec,
    MethodSpec,
    MetricsSpec,
    SweepSpec,
    load_config_file,
    parse_config,
)
from trl_onpolicy.compare.methods import METHODS, REGISTRY, TOKEN_LOSS, Method, MethodUnavailable
from trl_onpolicy.compare.metrics import PeakMemory, token_counter_callback
from trl_onpolicy.compare.runner import Comparison
from trl_onpolicy.compare.units import Unit

__all__ = ["METHODS", "REGISTRY", "TOKEN_LOSS", "Budget", "CompareConfig", "Comparison", "DataSpec", "Method",
           "MethodSpec", "MethodUnavailable", "MetricsSpec", "PeakMemory", "SweepSpec", "Unit", "load_config_file",
           "main", "parse_config", "token_counter_callback"]
