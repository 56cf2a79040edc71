"""`trl-onpolicy` command line: one subcommand per capability, each in its own module.

Every subcommand module exposes ``main(argv: list[str] | None) -> int | None`` and parses its own arguments (with
TRL's `TrlParser` where a recipe applies), so `trl-onpolicy <command> --help` documents it. Each command calls
`trl_onpolicy.utils.errors.work_started()` once its input is checked: the dispatcher below reports an error before
that mark as bad input (one line, exit status 2) and one after it as a failed run (traceback, exit status 1).
"""

from __future__ import annotations

import os
import sys
import traceback
from importlib import import_module

from trl_onpolicy.cli.recipe import join_negative_values
from trl_onpolicy.utils.errors import command_scope, raised_during_work

# subcommand -> (module, one-line description)
COMMANDS = {
    "quickstart": ("trl_onpolicy.cli.quickstart", "fine-tune the embedded SmolLM2-135M-Instruct with IDFT on offline math"),
    "train": ("trl_onpolicy.cli.train", "train with the token-loss family (idft, dft, eaft, sft) from a recipe"),
    "dpo": ("trl_onpolicy.cli.dpo", "train with TRL's DPOTrainer from a recipe"),
    "simpo": ("trl_onpolicy.cli.simpo", "train with SimPO (TRL's CPOTrainer, loss_type=simpo, cpo_alpha=0)"),
    "ddt": ("trl_onpolicy.cli.ddt", "score how on-policy a dataset is for a model (DDT)"),
    "ddt-filter": ("trl_onpolicy.cli.ddt:filter_main", "keep or drop samples by their DDT statistics"),
    "realign": ("trl_onpolicy.hinted.realign", "re-align a corpus to the model with Hinted Decoding"),
    "eval": ("trl_onpolicy.cli.eval", "evaluate a model on math benchmark sets"),
    "pairs": ("trl_onpolicy.eval.preferences", "build DPO/SimPO preference pairs from SFT data"),
    "compare": ("trl_onpolicy.compare.cli", "train and evaluate several methods side by side"),
}


def _usage() -> str:
    lines = ["usage: trl-onpolicy <command> [--config recipe.yaml] [options]", "", "commands:"]
    lines += [f"  {name:<11} {desc}" for name, (_, desc) in COMMANDS.items()]
    lines += ["", "Run `trl-onpolicy <command> --help` for a command's options."]
    return "\n".join(lines)


# bad input surfaces as one of these: a value out of range, a missing or unreadable file, a path of the wrong kind
BAD_INPUT_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)
BAD_INPUT = 2  # as argparse exits for a bad flag
FAILED = 1  # an error after the input was checked: the run failed, whatever the exception's type
INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a job stopped with Ctrl-C


def _show_traceback() -> bool:
    return os.environ.get("TRL_ONPOLICY_TRACEBACK", "0").lower() not in ("", "0", "false", "no")


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand. Every command ends the same way:

    * bad input, found by the checks a command makes before its work (`trl_onpolicy.utils.errors.work_started`),
      prints ``trl-onpolicy CMD: error: ...`` on stderr and exits 2 (no traceback unless ``TRL_ONPOLICY_TRACEBACK=1``);
    * an error once the work has started (a ValueError hours into training is a failure, not bad input) prints the
      traceback and ``trl-onpolicy CMD: failed: ...`` on stderr and exits 1;
    * Ctrl-C (SIGINT) exits 130 after the command has kept what it finished (checkpoints, DDT chunks, realign
      shards), so the same command resumes."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], join_negative_values(argv[1:])
    if name not in COMMANDS:
        print(f"trl-onpolicy: unknown command {name!r}.\n\n{_usage()}", file=sys.stderr)
        return BAD_INPUT
    target = COMMANDS[name][0]
    module, _, func = target.partition(":")
    with command_scope():
        try:
            if any(a == "--config" or a.startswith("--config=") for a in rest):
                from trl_onpolicy.cli.recipe import check_recipe_argv

                check_recipe_argv(rest)  # a missing, non-YAML, !!python-tagged or non-mapping recipe: one line, now
            result = getattr(import_module(module), func or "main")(rest)
        except KeyboardInterrupt:
            if _show_traceback():
                raise
            print(f"\ntrl-onpolicy {name}: interrupted. Finished work is kept (checkpoints, DDT chunks, realign shards): "
                  "run the same command again to resume.", file=sys.stderr, flush=True)
            return INTERRUPTED
        except Exception as err:
            if _show_traceback():
                raise
            if isinstance(err, BAD_INPUT_ERRORS) and not raised_during_work(err):
                # bad input (a value out of range, a missing file or column): one clear line, as argparse does for a
                # bad flag; TRL_ONPOLICY_TRACEBACK=1 shows the full traceback instead (for bug reports)
                print(f"trl-onpolicy {name}: error: {_one_line(err)}\n(set TRL_ONPOLICY_TRACEBACK=1 for the full "
                      "traceback)", file=sys.stderr, flush=True)
                return BAD_INPUT
            # the input was fine (or the command has a bug): the traceback is what a bug report needs
            traceback.print_exc(file=sys.stderr)
            print(f"trl-onpolicy {name}: failed: {type(err).__name__}: {_one_line(err)} (traceback above)",
                  file=sys.stderr, flush=True)
            return FAILED
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
