"""Old module paths of the flat 0.1 layout, kept importable for one release.

``import trl_onpolicy.idft_trainer`` (or ``from trl_onpolicy.hinted_online import HintedDataCollator``) still works:
a meta-path finder hands back the module at its new place (the same module object, so ``isinstance`` checks and
monkeypatching behave) and emits a `DeprecationWarning` naming the new path. Remove after 0.2.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

# old dotted path -> new dotted path (modules whose old name is now a package of the same name are not listed)
MOVED = {
    "trl_onpolicy.idft_config": "trl_onpolicy.trainer.idft_config",
    "trl_onpolicy.idft_trainer": "trl_onpolicy.trainer.idft_trainer",
    "trl_onpolicy.hinted_online": "trl_onpolicy.trainer.online",
    "trl_onpolicy.sdft": "trl_onpolicy.trainer.sdft",
    "trl_onpolicy.realign": "trl_onpolicy.hinted.realign",
    "trl_onpolicy.evaluation": "trl_onpolicy.eval.evaluation",
    "trl_onpolicy.answers": "trl_onpolicy.eval.answers",
    "trl_onpolicy.generation": "trl_onpolicy.utils.generation",
    "trl_onpolicy.forgetting": "trl_onpolicy.eval.forgetting",
    "trl_onpolicy.preferences": "trl_onpolicy.eval.preferences",
    "trl_onpolicy.models": "trl_onpolicy.utils.models",
    "trl_onpolicy.fingerprint": "trl_onpolicy.utils.fingerprint",
    "trl_onpolicy.validation": "trl_onpolicy.utils.validation",
    "trl_onpolicy.distributed": "trl_onpolicy.utils.distributed",
    "trl_onpolicy.compare_report": "trl_onpolicy.compare.report",
    "trl_onpolicy.ddt_cli": "trl_onpolicy.cli.ddt",
    "trl_onpolicy.quickstart": "trl_onpolicy.cli.quickstart",
    "trl_onpolicy.tiny": "trl_onpolicy.testing.tiny",
    "trl_onpolicy.scripts": "trl_onpolicy.cli",
    "trl_onpolicy.scripts.common": "trl_onpolicy.cli.recipe",
    "trl_onpolicy.scripts.train": "trl_onpolicy.cli.train",
    "trl_onpolicy.scripts.dpo": "trl_onpolicy.cli.dpo",
    "trl_onpolicy.scripts.simpo": "trl_onpolicy.cli.simpo",
}


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        new = MOVED[spec.name]
        warnings.warn(f"{spec.name} moved to {new}; the old path is deprecated and goes away in trl-onpolicy 0.2.",
                      DeprecationWarning, stacklevel=2)
        return importlib.import_module(new)

    def exec_module(self, module):  # the module at its new place is already executed
        pass


def install() -> None:
    if not any(isinstance(f, _MovedModuleFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _MovedModuleFinder())
