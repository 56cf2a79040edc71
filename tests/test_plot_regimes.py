"""scripts/plot_regimes.py: which (method, rate) each study panel shows, and that the figure is written."""


import pytest
from conftest import import_script


@pytest.fixture(scope="module")
def plot_regimes():
    yield from import_script("plot_regimes")


def _group(label, lr, acc, seeds=(0, 1, 2)):
    stat = lambda m: {"mean": m, "ci_low": m - 0.01, "ci_high": m + 0.01, "n": len(seeds)}  # noqa: E731
    return {"label": label, "learning_rate": lr, "seeds": list(seeds),
            "metrics": {"in_domain_acc": stat(acc), "in_domain_gain": stat(acc - 0.2), "kl_general": stat(0.01)}}


def _results(selection=None):
    groups = [_group("base", None, 0.2, seeds=[None]), _group("sft", "1e-05", 0.5), _group("sft", "3e-05", 0.6),
              _group("idft", "1e-05", 0.4), _group("idft", "3e-05", 0.3)]
    out = {"config": {"title": "t"}, "groups": groups}
    if selection:
        out["selection"] = {"chosen": selection}
    return out


def test_without_dev_selection_each_method_shows_its_best_test_rate(plot_regimes):
    groups, rule = plot_regimes.chosen_groups(_results())
    assert [(g["label"], g["learning_rate"]) for g in groups] == [("sft", "3e-05"), ("idft", "1e-05")]
    assert "test" in rule


def test_dev_selection_wins_over_the_test_optimum(plot_regimes):
    # DEV chose idft's 3e-5 although 1e-5 is better on the test set: the panel must show 3e-5
    groups, rule = plot_regimes.chosen_groups(_results({"base": None, "sft": 3e-5, "idft": 3e-5}))
    assert [(g["label"], g["learning_rate"]) for g in groups] == [("sft", "3e-05"), ("idft", "3e-05")]
    assert "DEV" in rule


def test_writes_the_figure(plot_regimes, tmp_path):
    import json

    for name, res in (("a", _results()), ("b", _results({"sft": 1e-5, "idft": 3e-5}))):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(res))
    out = tmp_path / "fig.png"
    assert plot_regimes.main(["--studies", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit, match="no results.json"):
        plot_regimes.main(["--studies", str(tmp_path / "missing"), "--out", str(out)])
