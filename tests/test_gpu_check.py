"""scripts/gpu_check.py in its CPU smoke mode. The whole `--cpu-smoke` run takes 30 s on the idle 2-core machine
but 2 minutes under load, most of it in the loss section's three benchmark subprocesses: too slow and too variable
for the suite. This runs the other three sections end to end with tiny sizes (about 10 s) and checks the summary
they write; the full smoke run is recorded in docs/benchmarks.md."""

import json

import pytest
import torch
from conftest import import_script


@pytest.fixture(scope="module")
def gpu_check():
    yield from import_script("gpu_check")


@pytest.mark.slow
def test_cpu_smoke_sections_write_one_summary(gpu_check, tmp_path):
    rc = gpu_check.main(["--cpu-smoke", "--sections", "ddt,hinted,train", "--train-steps", "3", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert rc == 0, report
    sections = report["sections"]
    assert set(sections) == {"ddt", "hinted", "train"} and not any("error" in s for s in sections.values())
    assert [r["new_tokens"] for r in sections["hinted"]["rows"]] == [16, 32]
    assert all(r["ratio"] > 0 and r["tokens_per_s_generate"] > 0 for r in sections["hinted"]["rows"])
    assert sections["ddt"]["rows"][0]["throughput_ratio"] > 0
    train = sections["train"]
    # IDFT at gamma = 1 reproduces TRL's DFT loss at every step; IDFT proper is a different loss
    assert train["match"] and train["steps_compared"] == 3 and train["max_rel_loss_diff"] <= 1e-6
    assert train["idft"]["loss"] != train["trl_dft"]["loss"]
    md = (tmp_path / "gpu_check.md").read_text()
    assert "**match**" in md and "| tiny | 4 | 32 |" in md


def test_refuses_to_run_without_a_gpu_unless_smoke(gpu_check, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    with pytest.raises(SystemExit):
        gpu_check.parse_args([])
    assert "--cpu-smoke" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--cpu-smoke", "--sections", "loss,bogus"])
