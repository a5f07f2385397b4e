"""Each command's --help: what it does, the commands people run, the groups, exit codes, docs."""

import subprocess
import sys

import pytest

BIN = __import__("pathlib").Path(sys.executable).parent


def _help(cmd: str) -> str:
    out = subprocess.run([str(BIN / cmd), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_harness_run_help_names_commands_groups_exit_codes_and_docs():
    text = _help("harness-run")
    assert text.startswith("harness-run: paired PEFT and full fine-tuning"), text[:200]
    assert "== Commands people run ==" in text and "harness-run -m method=full,lora,qlora" in text
    assert "method: dora, full, ia3, lora, lora-attention, qlora, rslora" in text  # the groups with their choices
    assert "hydra/launcher: parallel" in text
    assert "Exit codes: 0" in text and "docs/running.md" in text
    assert "learning_rate:" not in text  # the composed config is --cfg job's, not --help's
    assert "powered by Hydra" not in text


def test_harness_estimate_help_shows_its_own_settings_not_the_run_config():
    text = _help("harness-estimate")
    assert text.startswith("harness-estimate: what a harness-run job will need"), text[:200]
    assert "== Settings it reads ==" in text and "estimate.padded" in text and "format=table" in text
    assert "mmlu:" not in text and "n_heldout" not in text and "learning_rate:" not in text
    assert "docs/estimating.md" in text


@pytest.mark.parametrize("cmd, docs", [("harness-report", "docs/report.md"), ("harness-check", "docs/gate.md"),
                                       ("harness-status", "docs/running.md"),
                                       ("harness-export", "docs/trackers.md")])
def test_argparse_commands_name_exit_codes_and_docs(cmd, docs):
    text = _help(cmd)
    assert "exit codes: 0" in text and docs in text, text


def test_multirun_with_cfg_is_a_usage_error_in_one_line():
    out = subprocess.run([str(BIN / "harness-run"), "-m", "method=lora", "--cfg", "job"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().startswith("harness-run: error: Only one of") and "Traceback" not in out.stderr, out.stderr
