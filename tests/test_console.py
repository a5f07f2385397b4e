"""The console: step lines thinned to a handful per run, all of them back with HARNESS_VERBOSE=1."""

from types import SimpleNamespace

from harness.train import ProgressPrinter


def _printed_steps(capsys, max_steps: int) -> list[int]:
    printer = ProgressPrinter("run")
    state = SimpleNamespace(max_steps=max_steps, global_step=0)
    printer.on_train_begin(None, state, None)
    for step in range(1, max_steps + 1):
        state.global_step = step
        printer.on_log(None, state, None, logs={"loss": 1.0})
    return [int(line.split()[2].split("/")[0]) for line in capsys.readouterr().out.splitlines()]


def test_a_100_step_run_prints_six_step_lines_and_every_step_when_verbose(capsys, monkeypatch):
    monkeypatch.delenv("HARNESS_VERBOSE", raising=False)
    assert _printed_steps(capsys, 100) == [1, 20, 40, 60, 80, 100]
    assert _printed_steps(capsys, 5) == [1, 2, 3, 4, 5]
    monkeypatch.setenv("HARNESS_VERBOSE", "1")
    assert _printed_steps(capsys, 100) == list(range(1, 101))
