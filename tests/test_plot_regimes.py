"""scripts/plot_regimes.py: which (method, rate) each study panel shows, and that the figure is written."""


import pytest
from conftest import import_script


@pytest.fixture(scope="module")
def plot_regimes():
    yield from import_script("plot_regimes")


def _group(label, lr, acc, dev=None, seeds=(0, 1, 2)):
    """A group of a compare ``results.json``: per-seed records (keys are JSON strings) and seed statistics."""
    stat = lambda m: {"mean": m, "ci_low": m - 0.01, "ci_high": m + 0.01, "n": len(seeds)}  # noqa: E731
    per_seed = {str(s): {"in_domain_acc": acc, **({"dev_acc": dev} if dev is not None else {})} for s in seeds}
    metrics = {"in_domain_acc": stat(acc), "in_domain_gain": stat(acc - 0.2), "kl_general": stat(0.01)}
    if dev is not None:
        metrics["dev_acc"] = stat(dev)
    return {"label": label, "method": label, "learning_rate": lr, "seeds": list(seeds), "per_seed": per_seed,
            "metrics": metrics}


def _results(dev=False):
    """sft is best at 3e-5 on both splits; idft is best at 1e-5 on the test set but at 3e-5 on DEV."""
    d = (lambda x: x) if dev else (lambda x: None)  # noqa: E731
    groups = [_group("base", None, 0.2, seeds=[None]), _group("sft", 1e-5, 0.5, d(0.5)), _group("sft", 3e-5, 0.6, d(0.6)),
              _group("idft", 1e-5, 0.4, d(0.3)), _group("idft", 3e-5, 0.3, d(0.35))]
    return {"config": {"title": "t"}, "groups": groups}


def test_without_dev_selection_each_method_shows_its_best_test_rate(plot_regimes):
    groups, rule = plot_regimes.chosen_groups(_results())
    assert [(g["label"], g["learning_rate"]) for g in groups] == [("sft", 3e-5), ("idft", 1e-5)]
    assert "test" in rule


def test_dev_selection_wins_over_the_test_optimum(plot_regimes):
    # DEV chose idft's 3e-5 although 1e-5 is better on the test set: the panel must show 3e-5
    groups, rule = plot_regimes.chosen_groups(_results(dev=True))
    assert [(g["label"], g["learning_rate"]) for g in groups] == [("sft", 3e-5), ("idft", 3e-5)]
    assert "DEV" in rule


def test_writes_the_figure(plot_regimes, tmp_path):
    import json

    for name, res in (("a", _results()), ("b", _results(dev=True))):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(res))
    out = tmp_path / "fig.png"
    assert plot_regimes.main(["--studies", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit, match="no results.json"):
        plot_regimes.main(["--studies", str(tmp_path / "missing"), "--out", str(out)])
