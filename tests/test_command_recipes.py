"""The shipped recipes of the data commands (ddt, realign) parse with their command's TrlParser: every key known."""

from pathlib import Path

import pytest

from trl_onpolicy.cli.ddt import DDTArguments, _parse
from trl_onpolicy.hinted.realign import RealignConfig

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


@pytest.mark.parametrize("path", sorted((RECIPES / "ddt").glob("*.yaml")), ids=lambda p: p.name)
def test_ddt_recipes_parse(path):
    args, script_args, model_args = _parse(DDTArguments, ["--config", str(path)])
    assert script_args.dataset_name and model_args.model_name_or_path and args.output_dir


@pytest.mark.parametrize("path", sorted((RECIPES / "realign").glob("*.yaml")), ids=lambda p: p.name)
def test_realign_recipes_parse(path):
    from trl import TrlParser

    (config,) = TrlParser((RealignConfig,)).parse_args_and_config(["--config", str(path)])
    assert isinstance(config, RealignConfig) and config.model_name_or_path and config.dataset_name


@pytest.mark.parametrize("command, recipe", [("ddt", "ddt/smollm2_gsm.yaml"), ("realign", "realign/smollm2_gsm_demo.yaml")])
def test_misspelled_recipe_key_is_refused(tmp_path, capsys, monkeypatch, command, recipe):
    """A misspelled key in a shipped recipe: a ValueError naming the key from the parser (never an argparse exit, never
    silently ignored), and from `trl-onpolicy` exit status 2 with one error line naming it, before any work."""
    from trl import TrlParser

    from trl_onpolicy.cli import commands

    monkeypatch.delenv("TRL_ONPOLICY_TRACEBACK", raising=False)
    bad = tmp_path / "bad.yaml"
    bad.write_text((RECIPES / recipe).read_text() + "max_new_tokenz: 3\n")
    with pytest.raises(ValueError, match="max_new_tokenz"):
        if command == "ddt":
            _parse(DDTArguments, ["--config", str(bad)])
        else:
            TrlParser((RealignConfig,)).parse_args_and_config(["--config", str(bad)])
    assert commands.main([command, "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"trl-onpolicy {command}: error:") and "max_new_tokenz" in err and "Traceback" not in err, err
