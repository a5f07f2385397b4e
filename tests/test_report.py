"""harness-report on constructed run records: no training, no model, fast."""

from __future__ import annotations

import html
import json
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from harness import stats
from harness.records import run_id_for, stable_hash, write_items, write_record
from harness.report import AT_A_GLANCE, build_report, main, pareto_front
from harness.report import ROW_LABELS as ROWS
from harness.report.tables import ROWS as ROW_SPECS

# the rows every table shows (the optional ones only where some arm has their figures)
ALWAYS = [row.label for row in ROW_SPECS if not row.optional]

GiB = 2**30
MiB = 2**20
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
REPO = Path(__file__).resolve().parents[1]


def make_record(
    results: Path,
    method: str,
    rank: int | None = None,
    seed: int = 0,
    model: str = "tiny-model",
    status: str = "ok",
    error: str | None = None,
    mmlu_correct: list[bool] | None = None,
    indomain_correct: list[bool] | None = None,
    total_params: int = 1_000_000,
    **metrics,
) -> dict:
    """Write a schema-1 record (and its per-question answers) into ``results``; return it."""
    config = {
        "model": {"name": model},
        "data": {"name": "demo"},
        "seed": seed,
        "eval": {"mmlu_limit": 100},
        "hardware": {"name": "h200"},
        "method": {"name": method, "r": rank},
    }
    config_hash = stable_hash(config)
    run_id = run_id_for(method, rank, config_hash)
    base = {
        "trainable_params": None,
        "total_params": total_params,
        "peak_memory_bytes": None,
        "train_wall_s": None,
        "tokens_per_s": None,
        "train_tokens": None,
        "cost_usd": None,
        "mmlu_acc": None,
        "mmlu_stderr": None,
        "mmlu_n": None,
    }
    items = []
    for task, correct in (("mmlu", mmlu_correct), ("indomain", indomain_correct)):
        if correct is None:
            continue
        acc = sum(correct) / len(correct)
        base[f"{task}_acc"] = acc
        base[f"{task}_stderr"] = (acc * (1 - acc) / (len(correct) - 1)) ** 0.5
        base[f"{task}_n"] = len(correct)
        items += [
            {
                "task": task,
                "id": f"{task}-{i}",
                "subject": "s",
                "category": None,
                "pred": int(c),
                "target": 1,
                "correct": c,
            }
            for i, c in enumerate(correct)
        ]
    if mmlu_correct is not None:
        base |= {"mmlu_subset": True, "mmlu_num_fewshot": 0}
    record = {
        "schema": 1,
        "run_id": run_id,
        "config_hash": config_hash,
        "pair_key": stable_hash({"model": model, "data": "demo", "seed": seed}),
        "eval_key": stable_hash({"model": model, "eval": config["eval"]}),
        "status": status,
        "error": error,
        "method": method,
        "rank": rank,
        "model": {"name": model, "source": "config", "total_params": base["total_params"], "random_weights": False},
        "config": config,
        "env": {
            "versions": {"torch": "2.13", "peft": "0.1"},
            "git_commit": "abc",
            "device": "cuda",
            "device_name": "NVIDIA H200",
            "device_count": 1,
            "host": "h",
            "started_at": f"2025-03-0{seed + 1}T10:00:00+00:00",
            "ended_at": f"2025-03-0{seed + 1}T10:05:00+00:00",
        },
        "items_file": write_items(results, run_id, items) if items else None,
        "base_run_id": None,
        "metrics": base | metrics,
    }
    write_record(results, record)
    return record


def _answers(n_correct: int, n: int = 100) -> list[bool]:
    return [i < n_correct for i in range(n)]


def make_results(results: Path) -> dict[str, dict]:
    """A small sweep: base, full, LoRA r=8 x 3 seeds, QLoRA r=8 (failed), LoRA r=64 (oom)."""
    recs = {}
    recs["base"] = make_record(results, "base", mmlu_correct=_answers(50), indomain_correct=_answers(20))
    for seed in range(3):
        recs[f"full{seed}"] = make_record(
            results,
            "full",
            seed=seed,
            mmlu_correct=_answers(80),
            indomain_correct=_answers(60),
            trainable_params=1_000_000,
            trainable_share=1.0,
            peak_memory_bytes=4 * GiB,
            memory_device="cuda",
            run_wall_s=300.0,
            cost_usd=0.5,
            full_checkpoint_bytes=4 * GiB,
            full_checkpoint_bytes_estimated=False,
            loss_curve=[[1, 2.0], [2, 1.5]],
        )
        # LoRA answers a subset of what full gets right on MMLU (gap -10, -10, -10 pp for seed 0..2
        # with 70, 70, 70 right) and more on in-domain (gap +5/+10/+15 pp: mean +10, sd 5)
        recs[f"lora{seed}"] = make_record(
            results,
            "lora",
            rank=8,
            seed=seed,
            mmlu_correct=_answers(70),
            indomain_correct=_answers(65 + 5 * seed),
            trainable_params=10_000,
            trainable_share=0.01,
            peak_memory_bytes=(1 + seed) * GiB,
            memory_device="cuda",
            run_wall_s=90.0,
            cost_usd=0.0123,
            projected_cost_usd=12.5,
            projected_tokens=1_000_000_000,
            adapter_bytes=40 * MiB,
            full_checkpoint_bytes=4 * GiB,
            full_checkpoint_bytes_estimated=True,
            latency_merged_overhead=0.0,
            latency_dynamic_overhead=0.25,
            memory_breakdown_bytes={
                "parameters": GiB,
                "gradients": 0,
                "optimizer_state": 0,
                "activations": GiB,
                "other": 0,
            },
            loss_curve=[[1, 2.1], [2, 1.7]],
        )
    recs["qlora"] = make_record(
        results, "qlora", rank=8, status="failed", error="RuntimeError: bitsandbytes | broke\nat line 3"
    )
    recs["oom"] = make_record(results, "lora", rank=64, status="oom", error="CUDA out of memory")
    return recs


def _first_table(md: str) -> list[str]:
    """The lines of the first at-a-glance table (after the verdict; the estimated sections may
    append others)."""
    lines = md.splitlines()
    first = next(i for i, ln in enumerate(lines) if ln.startswith("## ") and ln != "## Verdict")
    start = next(i for i, ln in enumerate(lines) if ln.startswith("|") and i > first)
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return lines[start:end]


def _table(md: str) -> dict[str, dict[str, str]]:
    """The first at-a-glance table as {row label: {column header: cell}}."""
    lines = _first_table(md)
    split = lambda ln: [c.strip() for c in re.split(r"(?<!\\)\|", ln.strip())[1:-1]]
    header = split(lines[0])
    return {row_name(cells[0]): dict(zip(header[1:], cells[1:])) for cells in map(split, lines[2:])}


def row_name(label: str) -> str:
    """The row a rendered label belongs to: ``peak training memory (CUDA allocated; 1x H200)`` ->
    ``peak training memory`` (what the row means on these devices is in the parentheses)."""
    return next((r for r in ROWS if label == r or label.startswith(r + " (")), label)


def row_labels(md: str) -> list[str]:
    """The rendered row labels of the first table."""
    lines = _first_table(md)
    return [re.split(r"(?<!\\)\|", ln.strip())[1].strip() for ln in lines[2:]]


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[Path, Path, dict]:
    results = tmp_path_factory.mktemp("results")
    reports = tmp_path_factory.mktemp("reports")
    make_results(results)
    written = build_report(results, reports)
    return results, reports, written


def test_six_rows_and_their_values(report):
    _, _, written = report
    md = written[AT_A_GLANCE].read_text()
    table = _table(md)
    assert list(table) == ALWAYS  # serving N variants and the loss rows only where some arm has those figures
    # rows whose meaning depends on the device say which measure, which device and how many
    labels = row_labels(md)
    assert labels[1] == "peak training memory (CUDA allocated; 1x NVIDIA H200)"
    assert labels[2] == "training wall-clock; cost per run (1x NVIDIA H200)"
    assert labels[6] == "inference latency overhead vs base (1x NVIDIA H200)"
    columns = list(next(iter(table.values())))
    assert columns == ["base model", "full FT (3 seeds)", "LoRA r=8 (3 seeds)", "LoRA r=64", "QLoRA r=8"]
    lora = {row: cells["LoRA r=8 (3 seeds)"] for row, cells in table.items()}
    assert lora[ROWS[0]] == "10.0K (1%)"
    assert lora[ROWS[1]] == "2.00 ± 1.00 GiB"  # 1, 2, 3 GiB over the seeds
    assert lora[ROWS[2]] == "90.0 s; $0.0123; projected $12.50 for 1.00B tokens"
    assert lora[ROWS[5]] == "adapter 40.0 MiB (0.977%) vs full ~4.00 GiB (estimated)"
    assert lora[ROWS[6]] == "merged +0.0%, dynamic +25.0%"
    full = {row: cells["full FT (3 seeds)"] for row, cells in table.items()}
    assert full[ROWS[0]] == "1.00M (100%)"
    assert full[ROWS[1]] == "4.00 GiB"
    assert full[ROWS[6]] == "—"  # its own base: no adapter, no overhead to show
    # every accuracy with its 95% interval: 3 identical seeds of 80/100 keep one seed's question noise
    # (the low end is Wilson's on the 100 questions, which reaches further than 80 - 1.96 se)
    se = (0.16 * 100 / 99) ** 0.5 / 10
    wilson_low = 100 * stats.wilson95(0.8, 100)[0]
    assert full[ROWS[3]] == f"reference: acc 80.0% [{min(80 - 196 * se, wilson_low):.1f}, {80 + 196 * se:.1f}]"
    assert full[ROWS[5]] == "full 4.00 GiB"
    se = (0.25 * 100 / 99) ** 0.5 / 10
    assert table[ROWS[3]]["base model"] == f"acc 50.0% [{50 - 196 * se:.1f}, {50 + 196 * se:.1f}]"
    # the base model was not trained: its training rows say so, not 0 and not a wall-clock
    assert [table[r]["base model"] for r in ROWS[:3]] == ["n/a (not trained)"] * 3


def test_gap_sign_interval_and_seed_aggregation(report):
    _, _, written = report
    table = _table(written[AT_A_GLANCE].read_text())
    # MMLU: 10 of 100 questions flip from right to wrong, every seed: gap -10 pp, sd 0,
    # per-seed se = sqrt((10 * 0.9^2 + 90 * 0.1^2) / 99 / 100) = 0.030151; three identical seeds
    # answer the same questions, so the question noise stays one seed's (seeds never shrink it);
    # the interval is never narrower than Newcombe's paired one (70 both right, 10 only full, 20 neither)
    from harness.stats import newcombe_paired95

    se = (9 / 99 / 100) ** 0.5
    n_lo, n_hi = newcombe_paired95(70, 0, 10, 20)
    lo, hi = min(-10 - 196 * se, 100 * n_lo), max(-10 + 196 * se, 100 * n_hi)
    assert lo < -10 - 196 * se  # here Newcombe's is the wider below
    assert table[ROWS[3]]["LoRA r=8 (3 seeds)"] == f"-10.00 pp [{lo:+.2f}, {hi:+.2f}]"  # identical seeds: no ± 0
    # in-domain: PEFT is better by 5, 10, 15 pp: positive sign, mean 10, sd 5
    assert table[ROWS[4]]["LoRA r=8 (3 seeds)"].startswith("+10.00 ± 5.00 pp [+")


def test_failed_and_oom_runs_are_shown(report):
    _, _, written = report
    md = written[AT_A_GLANCE].read_text()
    table = _table(md)
    assert all(cells["LoRA r=64"].startswith("did not fit on 1x NVIDIA H200") for cells in table.values())
    assert table[ROWS[0]]["QLoRA r=8"] == "failed: RuntimeError: bitsandbytes \\| broke at line 3"
    assert all(table[row]["QLoRA r=8"] == "failed" for row in ALWAYS[1:])
    assert "5 runs" not in md and "9 runs (7 ok, 1 failed, 1 oom)" in md
    runs_csv = written["runs.csv"].read_text()
    assert runs_csv.count(",oom,") == 1 and runs_csv.count(",failed,") == 1


def test_partly_failed_arm_lists_the_failed_seed(tmp_path):
    results = tmp_path / "results"
    make_record(results, "full", mmlu_correct=_answers(80), peak_memory_bytes=GiB)
    make_record(results, "lora", rank=8, seed=0, mmlu_correct=_answers(70), peak_memory_bytes=GiB)
    make_record(results, "lora", rank=8, seed=1, status="oom")
    md = build_report(results, tmp_path / "reports")[AT_A_GLANCE].read_text()
    assert "LoRA r=8 (1 of 2 ok; 1 oom)" in md
    assert re.search(r"- LoRA r=8, seed 1 \(lora-r8-\w+\): did not fit on 1x NVIDIA H200", md)


def test_gap_names_seeds_without_a_full_pair(tmp_path):
    results = tmp_path / "results"
    make_record(results, "full", seed=0, mmlu_correct=_answers(80))
    make_record(results, "full", seed=1, status="failed", error="boom")
    make_record(results, "lora", rank=8, seed=0, mmlu_correct=_answers(70))
    make_record(results, "lora", rank=8, seed=1, mmlu_correct=_answers(75))
    table = _table(build_report(results, tmp_path / "reports")[AT_A_GLANCE].read_text())
    assert table[ROWS[3]]["LoRA r=8 (2 seeds)"].startswith("-10.00 pp [")
    assert table[ROWS[3]]["LoRA r=8 (2 seeds)"].endswith("(1 of 2 seeds have a full FT pair)")
    assert table[ROWS[4]]["LoRA r=8 (2 seeds)"] == "—"  # no in-domain eval in these records


def test_provenance_line(report):
    _, _, written = report
    md = written[AT_A_GLANCE].read_text()
    assert (
        "Provenance: 1x NVIDIA H200; runs 2025-03-01 to 2025-03-03; MMLU subset (100 questions, 0-shot); "
        "9 runs (7 ok, 1 failed, 1 oom)." in md
    )


def test_csv_tables(report):
    import pandas as pd

    _, _, written = report
    runs = pd.read_csv(written["runs.csv"])
    assert len(runs) == 9
    assert {"run_id", "status", "peak_memory_bytes", "memory_breakdown_bytes.activations", "version_torch"} <= set(
        runs.columns
    )
    arms = pd.read_csv(written["arms.csv"])
    lora = arms[(arms.method == "lora") & (arms["rank"] == 8)].iloc[0]
    assert lora.n_runs == 3 and lora.n_ok == 3
    assert lora.peak_memory_bytes_mean == 2 * GiB and lora.peak_memory_bytes_sd == GiB
    assert lora.gap_mmlu_mean == pytest.approx(-0.1) and lora.gap_indomain_sd == pytest.approx(0.05)
    assert arms[arms["rank"] == 64].iloc[0].n_oom == 1


def test_plots_written_and_skipped(report, tmp_path):
    _, _, written = report
    for name in (
        "peak_memory.png",
        "mmlu_by_rank.png",
        "cost_vs_accuracy.png",
        "memory_breakdown.png",
        "loss_curves.png",
    ):
        assert written[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # one figure helper: every plot is as wide (10 in at 100 dpi), so the page shows them at one scale
    widths = {int.from_bytes(p.read_bytes()[16:20], "big") for n, p in written.items() if n.endswith(".png")}
    assert widths == {1000}
    assert "scaling.png" not in written  # one model size only
    # no memory breakdown, loss curves or costs: those plots are skipped, the report still builds
    results = tmp_path / "results"
    make_record(results, "full", mmlu_correct=_answers(80))
    make_record(results, "lora", rank=8, mmlu_correct=_answers(70))
    written = build_report(results, tmp_path / "reports")
    assert {"memory_breakdown.png", "loss_curves.png", "cost_vs_accuracy.png", "peak_memory.png"}.isdisjoint(written)
    assert "mmlu_by_rank.png" in written


def test_scaling_plot_with_two_model_sizes(tmp_path):
    results = tmp_path / "results"
    for model, size in (("small", 1_000_000), ("large", 8_000_000)):
        for method, rank in (("full", None), ("lora", 8)):
            make_record(
                results,
                method,
                rank=rank,
                model=model,
                total_params=size,
                mmlu_correct=_answers(70),
                peak_memory_bytes=size * 16,
            )
    assert "scaling.png" in build_report(results, tmp_path / "reports")


def test_pareto_front():
    points = [(1, 50), (2, 60), (2, 55), (3, 60), (0.5, 40), (4, 70), (1, 50)]
    # (2, 55) and (3, 60) are beaten by (2, 60); the duplicate (1, 50) is beaten by nothing
    assert pareto_front(points) == [4, 0, 6, 1, 5]
    assert pareto_front([]) == []
    assert pareto_front([(5.0, 0.1)]) == [0]


def test_broken_record_is_skipped_with_warning(tmp_path, caplog):
    results = tmp_path / "results"
    make_record(results, "full", mmlu_correct=_answers(80))
    (results / "broken.json").write_text("{not json")
    (results / "old-schema.json").write_text('{"schema": 0}')
    with caplog.at_level(logging.WARNING):
        written = build_report(results, tmp_path / "reports")
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "broken.json" in warned and "old-schema.json" in warned
    md = written[AT_A_GLANCE].read_text()
    assert "## Skipped records" in md and "- broken.json: Expecting property name" in md
    assert "- old-schema.json: missing fields: run_id" in md
    assert "full FT" in md


def test_cli_warns_on_stderr_and_prints_where(tmp_path):
    results = tmp_path / "results"
    make_record(results, "full", mmlu_correct=_answers(80))
    (results / "broken.json").write_text("{not json")
    out = subprocess.run(
        [sys.executable, "-m", "harness.report", "--results", str(results), "--reports", str(tmp_path / "rep")],
        check=False,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "broken.json" in out.stderr
    assert f"at-a-glance table: {tmp_path / 'rep' / AT_A_GLANCE}" in out.stdout


def test_empty_results_still_build(tmp_path):
    (tmp_path / "results").mkdir()
    written = build_report(tmp_path / "results", tmp_path / "reports")
    assert "No run records found." in written[AT_A_GLANCE].read_text()
    assert not [n for n in written if n.endswith(".png")]
    assert "<img" not in written["index.html"].read_text()


def test_cli_missing_results_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--results", str(tmp_path / "nope"), "--reports", str(tmp_path / "rep")])
    assert exc.value.code == 2
    assert "nope" in capsys.readouterr().err


def test_deterministic(tmp_path):
    results = tmp_path / "results"
    make_results(results)
    first = build_report(results, tmp_path / "a")
    second = build_report(results, tmp_path / "b")
    for name in (AT_A_GLANCE, "runs.csv", "arms.csv", "index.html"):
        assert first[name].read_bytes() == second[name].read_bytes(), name


def find_browser() -> str | None:
    """A Chromium-family browser on PATH (.ci/run installs Debian's `chromium` where none is)."""
    for name in BROWSERS:
        if path := shutil.which(name):
            return path
    return None


def browse(page: Path, probe_script: str, attr: str, tmp_path: Path, *flags: str) -> dict:
    """Open a copy of ``page`` with ``probe_script`` in headless chromium; the JSON the script left
    in ``data-<attr>`` on the body. The copy sits beside the page, so relative paths still load."""
    probe = page.with_name(f"_{attr}_probe.html")
    probe.write_text(page.read_text().replace("</body>", probe_script + "</body>"))
    try:
        proc = subprocess.run(
            [find_browser(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'browser'}",
             "--window-size=1280,2000", *flags, "--dump-dom", probe.as_uri()],
            check=False, capture_output=True, text=True, timeout=120,
        )
    finally:
        probe.unlink()
    found = re.search(rf'data-{attr}="([^"]*)"', proc.stdout)
    assert found, proc.stdout[-2000:] + proc.stderr[-2000:]
    return json.loads(html.unescape(found.group(1)))


# Runs after the page's load event: what a person would see, as JSON in a data attribute.
PROBE = """<script>window.addEventListener('load', () => {
  const rows = [...document.querySelectorAll('table:not(.verdict) tbody tr')].map(tr => tr.querySelector('th').textContent);
  const verdict = [...document.querySelectorAll('#verdict table.verdict tbody tr')].map(tr => tr.querySelector('th').textContent);
  const images = [...document.images].map(i => ({src: i.getAttribute('src'), complete: i.complete,
    width: i.naturalWidth, height: i.naturalHeight, shown: i.getBoundingClientRect().width}));
  document.body.dataset.probe = JSON.stringify({rows, verdict, images,
    tables: document.querySelectorAll('table:not(.verdict)').length,
    text: document.body.innerText});
})</script>"""


@pytest.mark.skipif(find_browser() is None, reason=f"no browser on PATH ({', '.join(BROWSERS)}); .ci/run installs one")
def test_index_html_renders_in_a_headless_browser(report, tmp_path):
    _, reports, written = report
    seen = browse(written["index.html"], PROBE, "probe", tmp_path)
    # the at-a-glance table with every row, by its label
    assert seen["tables"] == 1 and [row_name(r) for r in seen["rows"]] == ALWAYS
    # the verdict first, one row per arm but the base model
    assert seen["verdict"] == ["full FT", "LoRA r=8", "LoRA r=64", "QLoRA r=8"]
    assert seen["text"].index("Verdict") < seen["text"].index("trainable parameters")
    assert "did not fit on 1x NVIDIA H200" in seen["text"]
    # every plot written is on the page, loaded (decoded, non-zero size) and laid out
    plots = sorted(n for n in written if n.endswith(".png"))
    assert len(plots) == 6 and sorted(i["src"] for i in seen["images"]) == plots
    broken = [i for i in seen["images"] if not (i["complete"] and i["width"] > 0 and i["height"] > 0 and i["shown"] > 0)]
    assert not broken, broken


def test_a_broken_image_is_caught_by_the_render_probe(report, tmp_path):
    """The probe itself: an image whose file is missing shows up with naturalWidth 0."""
    if find_browser() is None:
        pytest.skip(f"no browser on PATH ({', '.join(BROWSERS)}); .ci/run installs one")
    page = tmp_path / "page.html"
    page.write_text('<html><body><img src="missing.png"></body></html>')
    seen = browse(page, PROBE, "probe", tmp_path)
    assert [i["width"] for i in seen["images"]] == [0]


def test_a_gap_on_a_single_seed_says_so(tmp_path):
    results = tmp_path / "results"
    make_record(results, "full", mmlu_correct=_answers(80))
    make_record(results, "lora", rank=8, mmlu_correct=_answers(70))
    table = _table(build_report(results, tmp_path / "reports")[AT_A_GLANCE].read_text())
    assert table[ROWS[3]]["LoRA r=8"].endswith("(1 seed: training noise not estimated)")
    make_record(results, "full", seed=1, mmlu_correct=_answers(80))
    make_record(results, "lora", rank=8, seed=1, mmlu_correct=_answers(71))
    table = _table(build_report(results, tmp_path / "reports2")[AT_A_GLANCE].read_text())
    assert "1 seed" not in table[ROWS[3]]["LoRA r=8 (2 seeds)"]


def test_memory_row_names_the_measure_and_the_devices(tmp_path):
    """memory_measure when the record has it, else named from memory_device; several devices per rank."""
    results = tmp_path / "results"
    make_record(results, "full", peak_memory_bytes=GiB, memory_device="cpu", mmlu_correct=_answers(80))
    make_record(results, "lora", rank=8, peak_memory_bytes=GiB, memory_device="cpu", memory_measure="CPU RSS",
                world_size=2, mmlu_correct=_answers(80))
    labels = row_labels(build_report(results, tmp_path / "reports")[AT_A_GLANCE].read_text())
    assert labels[1] == "peak training memory (CPU RSS / CPU RSS growth; largest rank; 1x NVIDIA H200)"


def _cost_front(results: Path) -> dict[str, str]:
    from harness.report import _load
    from harness.report.plots import cost_front
    from harness.report.tables import group

    return {p.arm.label: status for p, status in cost_front(group(_load(results)[0], results))}


def test_pareto_front_does_not_crown_a_lead_inside_the_noise(tmp_path):
    """Two arms of one setting 2 pp apart on 57 questions (the demo): the dearer one's lead is noise,
    so neither dominates; 30 pp apart it is beyond the noise and the front says so. The cheaper arm
    is the cheapest either way, never a lead."""
    noise, clear = tmp_path / "noise", tmp_path / "clear"
    make_record(noise, "lora", rank=8, cost_usd=0.01, mmlu_correct=_answers(20, 57))
    make_record(noise, "full", cost_usd=0.02, mmlu_correct=_answers(21, 57))
    assert _cost_front(noise) == {"LoRA r=8": "cheapest", "full FT": "within noise"}
    make_record(clear, "lora", rank=8, cost_usd=0.01, mmlu_correct=_answers(20, 57))
    make_record(clear, "full", cost_usd=0.02, mmlu_correct=_answers(37, 57))
    assert _cost_front(clear) == {"LoRA r=8": "cheapest", "full FT": "front"}
    assert "cost_vs_accuracy.png" in build_report(noise, tmp_path / "reports")


def test_front_status_rules():
    from harness.report.plots import front_status

    points = [(1, 50), (2, 60), (2, 55), (3, 61), (0.5, 40)]
    significant = lambda j, i: points[j][1] - points[i][1] > 3  # a lead over 3 points is beyond the noise
    # (2, 55) is beaten by (2, 60); (3, 61) leads (2, 60) by 1 only; (0.5, 40) is the cheapest: no lead
    assert front_status(points, significant) == ["front", "front", "dominated", "within noise", "cheapest"]
    assert front_status(points, lambda j, i: True) == ["front", "front", "dominated", "front", "cheapest"]
    twins = [(1, 50), (1, 50)]  # both cost the least, neither beats the other
    assert front_status(twins, lambda j, i: twins[j][1] - twins[i][1] > 3) == ["cheapest", "cheapest"]
    # at the lowest cost the more accurate one is the cheapest, the other dominated
    assert front_status([(1, 50), (1, 60)], lambda j, i: True) == ["dominated", "cheapest"]
    assert front_status([], lambda j, i: True) == []


def test_equal_accuracies_make_no_lead(tmp_path):
    """A user's sweep: three arms all at 29.8% (17 of 57), QLoRA the cheapest. QLoRA is the cheapest,
    not "a lead beyond the noise" (it had nothing cheaper to beat); the dearer arms are dominated, and
    the plot's legend has no lead entry."""
    from harness.report import _load
    from harness.report.plots import cost_front, front_status, plot_cost_vs_accuracy
    from harness.report.tables import group

    assert front_status([(1, 0.298), (2, 0.298), (3, 0.298)], lambda j, i: True) == [
        "cheapest", "dominated", "dominated"]
    results = tmp_path / "results"
    for method, rank, cost in (("qlora", 8, 2e-5), ("lora", 8, 3e-5), ("full", None, 9e-5)):
        make_record(results, method, rank=rank, cost_usd=cost, mmlu_correct=_answers(17, 57))
    tables = group(_load(results)[0], results)
    assert {p.arm.label: s for p, s in cost_front(tables)} == {
        "QLoRA r=8": "cheapest", "LoRA r=8": "dominated", "full FT": "dominated"}
    fig = plot_cost_vs_accuracy(tables)
    legend = [t.get_text().replace("\n", " ") for t in fig.legends[0].get_texts()]
    assert "cheapest arm (nothing cheaper to beat)" in legend
    assert not [t for t in legend if t.startswith("lead")], legend


def test_latency_by_phase_and_one_runs_interval(tmp_path):
    """Records with prefill and decode timed apart show both; one run shows its probe's interval."""
    results = tmp_path / "results"
    make_record(results, "full", mmlu_correct=_answers(80))
    make_record(results, "lora", rank=8, mmlu_correct=_answers(70), latency_prefill_merged_overhead=0.0,
                latency_prefill_dynamic_overhead=0.05, latency_decode_merged_overhead=0.004,
                latency_decode_merged_overhead_ci_low=-0.012, latency_decode_merged_overhead_ci_high=0.021,
                adapter_bytes=40 * MiB, adapter_serving_bytes=20 * MiB, full_checkpoint_bytes=4 * GiB,
                serving_dtype="bfloat16")
    table = _table(build_report(results, tmp_path / "reports")[AT_A_GLANCE].read_text())
    assert table[ROWS[6]]["LoRA r=8"] == ("prefill: merged +0.0%, dynamic +5.0%; "
                                          "decode/token: merged +0.4% [-1.2, +2.1]")
    # the adapter at the serving dtype (20 MiB), not its fp32 file (40 MiB), beside the checkpoint
    assert table[ROWS[5]]["LoRA r=8"] == "adapter 20.0 MiB (0.488%) vs full 4.00 GiB (bfloat16)"


def test_a_failure_names_its_phase_when_recorded(tmp_path):
    results = tmp_path / "results"
    make_record(results, "full", mmlu_correct=_answers(80))
    rec = make_record(results, "lora", rank=8, status="oom", error="CUDA out of memory")
    rec["failed_phase"] = "eval"  # an out-of-memory during evaluation, after training finished
    write_record(results, rec)
    table = _table(build_report(results, tmp_path / "reports")[AT_A_GLANCE].read_text())
    assert table[ROWS[1]]["LoRA r=8"] == "did not fit on 1x NVIDIA H200 (in eval)"


def test_a_long_failure_keeps_its_phase_and_names_it_once(tmp_path):
    results = tmp_path / "results"
    make_record(results, "full", mmlu_correct=_answers(80))
    rec = make_record(results, "lora", rank=8, status="failed",
                      error="RuntimeError: " + "a very long message " * 10 + "(in phase latency)")
    rec["failed_phase"] = "latency"
    write_record(results, rec)
    cell = _table(build_report(results, tmp_path / "reports")[AT_A_GLANCE].read_text())[ROWS[0]]["LoRA r=8"]
    assert cell.startswith("failed (in latency): RuntimeError: a very long") and cell.count("latency") == 1


# ---------------------------------------------------------------- one colour per method, readable money, tasks


def _rich_sweep(results: Path, mmlu: bool = True) -> None:
    """Two model sizes x (base, full, LoRA r=8 and r=64, QLoRA r=8, DoRA r=8, an unknown PEFT type),
    one seed, with everything the plots draw: memory, costs, breakdowns, loss curves, the in-domain
    gain and the forgetting items (general-text losses against the base model)."""
    from harness.records import read_items

    arms = (("full", None, 60, 0.5), ("lora", 8, 55, 0.02), ("lora", 64, 57, 0.03), ("qlora", 8, 52, 0.01),
            ("dora", 8, 56, 0.025), ("vera", 8, 50, 0.015))
    for model, size in (("small", 1_000_000), ("large", 8_000_000)):
        base = make_record(results, "base", model=model, total_params=size, indomain_correct=_answers(20),
                           mmlu_correct=_answers(40) if mmlu else None)
        forgetting = lambda nll: [{"task": "forgetting", "id": f"f{i}", "nll": nll + i / 10, "n_tokens": 64}
                                  for i in range(8)]
        base["items_file"] = write_items(results, base["run_id"], read_items(results, base) + forgetting(100.0))
        write_record(results, base)
        for i, (method, rank, right, cost) in enumerate(arms):
            rec = make_record(
                results, method, rank=rank, model=model, total_params=size,
                mmlu_correct=_answers(right - 10) if mmlu else None, indomain_correct=_answers(right),
                peak_memory_bytes=(8 - i) * GiB * size // 1_000_000, memory_device="cuda", cost_usd=cost,
                indomain_gain_vs_base=(right - 20) / 100, loss_curve=[[1, 2.0 + i / 10], [2, 1.5 + i / 10]],
                memory_breakdown_bytes={"parameters": GiB, "gradients": GiB // 2, "optimizer_state": GiB // 4,
                                        "activations": GiB, "other": GiB // 8},
            )
            rec["base_run_id"] = base["run_id"]
            rec["items_file"] = write_items(results, rec["run_id"], read_items(results, rec) + forgetting(100.0 + i))
            rec["metrics"]["variants"] = _variants(method, 2 * size, 2 * size * rank // 1000 if rank else None, i)
            write_record(results, rec)


def _variants(method: str, checkpoint: int, adapter: int | None, i: int) -> list[dict]:
    """Serving-N-variants entries as harness.measure.variants writes them (full FT: checkpoints only)."""
    out = []
    for n in (1, 8):
        e = {"n": n, "merged_bytes": n * checkpoint, "merged_disk_bytes": n * checkpoint}
        if adapter:
            ratio = {"ratio": 1.1 + i / 100 + n / 100, "ci": [1.05, 1.2 + n / 100]}
            e |= {"resident_bytes": checkpoint + n * adapter, "adapters_disk_bytes": n * adapter,
                  "mixed_vs_merged_prefill": ratio, "mixed_vs_merged_decode": ratio,
                  "switching": {"set_adapter": {"median_s": 1e-4, "ci_s": [5e-5, 2e-4], "n": 6}}}
        out.append(e)
    return out


@pytest.fixture(scope="module")
def rich_tables(tmp_path_factory):
    from harness.report import _load
    from harness.report.tables import group

    results = tmp_path_factory.mktemp("rich")
    _rich_sweep(results)
    return group(_load(results)[0], results)


def _rgb(color) -> tuple[float, float, float]:
    from matplotlib.colors import to_rgb

    return tuple(round(c, 3) for c in to_rgb(color))


def _artist_colors(artist) -> list:
    """The colours an artist draws with (a container: its parts; "none" left out)."""
    from matplotlib.collections import Collection
    from matplotlib.container import Container
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    if isinstance(artist, Container):
        return [c for part in artist.get_children() for c in _artist_colors(part)]
    if isinstance(artist, Line2D):
        return [artist.get_color()]
    if isinstance(artist, Patch):
        return [c for c in (artist.get_facecolor(), artist.get_edgecolor()) if c[3] > 0]
    if isinstance(artist, Collection):
        return [c for c in [*artist.get_facecolors(), *artist.get_edgecolors()] if c[3] > 0]
    return []


def test_one_colour_per_method_in_every_plot(rich_tables):
    """Every plot draws a method's artists in method_color(method) (arms of one method: one hue,
    other line styles), and the memory breakdown's categories in colours no method has."""
    from matplotlib import rc_context

    from harness.identity import METHOD_LABEL
    from harness.report.plots import (
        BREAKDOWN_STYLE,
        METHOD_COLORS,
        PLOTS,
        RESERVED_COLORS,
        STYLE,
        method_color,
    )

    methods = {a.method for t in rich_tables for a in t.arms}
    assert methods == {"base", "full", "lora", "qlora", "dora", "vera"}
    assert method_color("vera") in RESERVED_COLORS and method_color("vera") == method_color("vera")
    everyone = [*METHOD_COLORS.values(), *RESERVED_COLORS]
    assert len({_rgb(c) for c in everyone}) == len(everyone)  # no two methods share a colour
    method_of = {a.label: a.method for t in rich_tables for a in t.arms}
    method_of |= {METHOD_LABEL.get(m, m): m for m in methods}
    neutral = {_rgb("black"), _rgb("white")}
    checked: dict[str, int] = {}
    for name, _, plot in PLOTS:
        if name == "validation_vs_lr.png":  # needs a tuned sweep: tests/test_tuning.py checks its colours
            continue
        with rc_context(STYLE):
            fig = plot(rich_tables)
        assert fig is not None, name
        checked[name] = 0
        for ax in fig.axes:
            for artist, label in zip(*ax.get_legend_handles_labels()):
                colours = {_rgb(c) for c in _artist_colors(artist)} - neutral
                if name == "memory_breakdown.png":
                    assert label in {p.replace("_", " ") for p in BREAKDOWN_STYLE}, label
                    for c in colours:  # far from every method colour, not just unequal
                        assert min(sum((x - y) ** 2 for x, y in zip(c, _rgb(m))) ** 0.5 for m in everyone) > 0.15, (
                            label, c)
                elif (method := method_of.get(label.split(": ")[-1])) is not None:
                    assert colours == {_rgb(method_color(method))}, (name, label, colours)
                    checked[name] += 1
            if name == "peak_memory.png":  # the bars themselves carry no label: the tick says whose bar
                ticks = [t.get_text() for t in ax.get_xticklabels()]
                bars = [p for p in ax.patches if p.get_height() > 0 and p.get_facecolor()[3] > 0]
                assert len(bars) == len(ticks)
                for bar, tick in zip(sorted(bars, key=lambda b: b.get_x()), ticks):
                    assert _rgb(bar.get_facecolor()) == _rgb(method_color(method_of[tick])), tick
                    checked[name] += 1
        if name == "loss_curves.png":  # LoRA r=8 and r=64: the same colour, another line style
            lines = {ln.get_label(): ln for ln in fig.axes[0].get_lines()}
            assert lines["LoRA r=8"].get_color() == lines["LoRA r=64"].get_color()
            assert lines["LoRA r=8"].get_linestyle() != lines["LoRA r=64"].get_linestyle()
    assert all(checked[name] >= 3 for name in checked if name != "memory_breakdown.png"), checked


def test_serving_n_variants_reads_memory_latency_and_switching_at_the_largest_n(rich_tables):
    from harness.report.tables import _variants_cell

    arms = {a.label: a for a in rich_tables[0].arms}
    lora = _variants_cell(rich_tables[0], arms["LoRA r=8"])
    # 2 MB checkpoint + 8 x 16 KB adapters, against 8 x 2 MB; the ratios with their intervals
    assert lora == ("N=8: base + 8 adapters 2.03 MiB vs 8 merged 15.3 MiB (computed); "
                    "mixed batch vs merged: prefill ×1.19 [1.05, 1.28], decode ×1.19 [1.05, 1.28]; switch 0.1 ms")
    assert _variants_cell(rich_tables[0], arms["full FT"]) == ("N=8: 8 checkpoints 15.3 MiB in memory and on disk "
                                                               "(computed)")
    assert _variants_cell(rich_tables[0], arms["base model"]) == "—"


def test_money_reads_in_dollars_and_cents():
    from harness.report.fmt import fmt_money

    assert [fmt_money(v) for v in (2e-5, 1e-4, 0.005, 0.0123, 0.5, 0.9999, 1, 1.5, 12.5, 999.4, 1234, 0)] == [
        "0.002¢", "0.01¢", "0.5¢", "1.23¢", "50¢", "$1", "$1", "$1.5", "$12.5", "$999", "$1,234", "$0"]
    assert fmt_money(-0.005) == "-0.5¢"


def test_cost_axis_ticks_are_money(tmp_path):
    """Costs of a few thousandths of a cent (a tiny demo model): cents on the ticks, never $2e-05."""
    from harness.report import _load
    from harness.report.plots import plot_cost_vs_accuracy
    from harness.report.tables import group

    results = tmp_path / "results"
    make_record(results, "lora", rank=8, cost_usd=2e-5, mmlu_correct=_answers(20, 57))
    make_record(results, "full", cost_usd=9e-5, mmlu_correct=_answers(37, 57))
    fig = plot_cost_vs_accuracy(group(_load(results)[0], results))
    fig.canvas.draw()
    ticks = [t.get_text() for t in fig.axes[0].get_xticklabels() if t.get_text()]
    assert ticks and all(t.endswith("¢") or t == "$0" for t in ticks), ticks
    assert not [t for t in ticks if "e-" in t or "e+" in t], ticks


def test_cost_and_scaling_plots_without_mmlu(tmp_path):
    """A sweep with MMLU off (in-domain only, like ci-smoke) still gets the cost-vs-accuracy plot,
    one in-domain panel; with MMLU on it has a panel per task. scaling.png draws the in-domain gap."""
    from harness.report import _load
    from harness.report.plots import plot_cost_vs_accuracy, plot_scaling
    from harness.report.tables import group

    results = tmp_path / "results"
    _rich_sweep(results, mmlu=False)
    tables = group(_load(results)[0], results)
    fig = plot_cost_vs_accuracy(tables)
    assert fig is not None and [ax.get_ylabel() for ax in fig.axes if ax.get_visible()] == ["in-domain accuracy (%)"]
    fig = plot_scaling(tables)
    gap_axes = [ax for ax in fig.axes if ax.get_visible() and "gap" in ax.get_ylabel()]
    assert [ax.get_ylabel() for ax in gap_axes] == ["in-domain gap vs full FT (pp, 95% interval)"]
    assert {c.get_label() for c in gap_axes[0].containers} == {"LoRA r=8", "LoRA r=64", "QLoRA r=8", "dora r=8",
                                                                "vera r=8"}
    assert not [ax for ax in fig.axes if "MMLU" in ax.get_ylabel()]
    written = build_report(results, tmp_path / "reports")
    assert {"cost_vs_accuracy.png", "scaling.png"} <= set(written)


def test_cost_plot_has_a_panel_per_task(rich_tables):
    from harness.report.plots import plot_cost_vs_accuracy

    fig = plot_cost_vs_accuracy(rich_tables)
    assert [ax.get_ylabel() for ax in fig.axes if ax.get_visible()] == ["MMLU accuracy (%)", "in-domain accuracy (%)"]


# ---------------------------------------------------------------- the explorer (plotly, optional)



def test_explorer_figure_one_point_per_run_in_the_method_colours(report):
    pytest.importorskip("plotly")
    from matplotlib.colors import to_hex

    from harness.report import _load
    from harness.report.explorer import explorer_data, explorer_figure
    from harness.report.plots import method_color
    from harness.report.tables import group

    results, reports, written = report
    tables = group(_load(results)[0], results)
    runs, metrics = explorer_data(tables)
    assert len(runs) == 7  # the ok runs: base, full x 3, LoRA r=8 x 3 (the failed and the OOM run have nothing)
    labels = [m.label for m in metrics]
    assert labels[:6] == ["peak training memory (GiB)", "cost per run (¢)", "in-domain accuracy (%)",
                          "MMLU accuracy (%)", "in-domain gap vs full FT (pp, this seed)",
                          "MMLU gap vs full FT (pp, this seed)"]
    by = {m.name: m.values for m in metrics}
    assert by["peak_memory_bytes"] == [None, 4.0, 4.0, 4.0, 1.0, 2.0, 3.0]
    assert by["cost_usd"] == [None, 50.0, 50.0, 50.0, 1.23, 1.23, 1.23]
    assert by["gap_indomain"] == [None, None, None, None, 5.0, 10.0, 15.0]  # 65/70/75 vs full's 60 per seed
    fig = explorer_figure(tables)
    assert [(t["name"], t["marker"]["color"]) for t in fig["data"]] == [
        (name, to_hex(method_color(m))) for name, m in (("base model", "base"), ("full FT", "full"), ("LoRA", "lora"))]
    assert sum(len(t["x"]) for t in fig["data"]) == 7
    x_menu, y_menu = fig["layout"]["updatemenus"]
    assert [b["label"] for b in x_menu["buttons"]] == labels == [b["label"] for b in y_menu["buttons"]]
    assert fig["layout"]["xaxis"]["title"]["text"] == labels[x_menu["active"]] == "peak training memory (GiB)"
    assert fig["layout"]["yaxis"]["title"]["text"] == labels[y_menu["active"]] == "in-domain accuracy (%)"
    lora = fig["data"][2]["text"][1]
    assert all(f"{k}: " in lora for k in ("method", "rank", "seed", "lr", "run_id", "model", "data", "hardware"))
    assert "rank: 8" in lora and "seed: 1" in lora and "model: tiny-model" in lora and "hardware: h200" in lora
    # the page: plotly.js beside index.html, nothing loaded from outside
    page = written["index.html"].read_text()
    assert '<script src="plotly.min.js"' in page and (reports / "plotly.min.js").stat().st_size > 1_000_000
    assert not re.search(r'(src|href)="(https?:)?//', page)
    assert page.index("<h2>Plots</h2>") < page.index("<h2>Explorer</h2>")


def test_without_plotly_the_page_says_how_to_get_the_explorer(tmp_path, monkeypatch):
    results = tmp_path / "results"
    make_record(results, "full", mmlu_correct=_answers(80), peak_memory_bytes=GiB)
    make_record(results, "lora", rank=8, mmlu_correct=_answers(70), peak_memory_bytes=GiB // 2)
    reports = tmp_path / "reports"
    reports.mkdir()
    (reports / "plotly.min.js").write_text("// stale")
    monkeypatch.setitem(sys.modules, "plotly", None)  # import plotly raises ImportError
    page = build_report(results, reports)["index.html"].read_text()
    assert "<h2>Explorer</h2>" in page and "pip install 'peft-harness[plotly]'" in html.unescape(page)
    assert "plotly.min.js" not in page and not (reports / "plotly.min.js").exists()


# Opens the explorer's x menu and picks MMLU accuracy, then the y menu and picks the cost, clicking
# as a person does; reports the points (position, fill) per trace, the axis titles and a hover.
EXPLORER_PROBE = """<script>window.addEventListener('load', async () => {
  const out = {};
  try {
    const gd = document.getElementById('explorer');
    const sleep = ms => new Promise(r => setTimeout(r, ms));
    const points = () => [...gd.querySelectorAll('.scatterlayer .trace')].map(t =>
      [...t.querySelectorAll('path.point')].map(p => [p.getAttribute('transform'), p.style.fill]));
    const titles = () => ['x', 'y'].map(a => gd.querySelector(`.g-${a}title text`).textContent);
    const pick = async (menu, label) => {
      const header = [...gd.querySelectorAll('.updatemenu-header')].find(h => h.textContent === menu);
      header.dispatchEvent(new MouseEvent('click', {bubbles: true}));
      await sleep(300);
      const button = [...gd.querySelectorAll('.updatemenu-dropdown-button')].find(b => b.textContent === label);
      button.dispatchEvent(new MouseEvent('click', {bubbles: true}));
      await sleep(500);
    };
    out.steps = [{points: points(), titles: titles()}];
    await pick(titles()[0], 'MMLU accuracy (%)');
    out.steps.push({points: points(), titles: titles()});
    await pick(titles()[1], 'cost per run (¢)');
    out.steps.push({points: points(), titles: titles()});
    Plotly.Fx.hover(gd, [{curveNumber: 2, pointNumber: 1}]);
    await sleep(200);
    out.hover = gd.querySelector('.hoverlayer').textContent;
  } catch (e) { out.error = String(e); }
  document.body.dataset.explorer = JSON.stringify(out);
})</script>"""


@pytest.mark.skipif(find_browser() is None, reason=f"no browser on PATH ({', '.join(BROWSERS)}); .ci/run installs one")
def test_explorer_draws_and_redraws_in_a_headless_browser(report, tmp_path):
    pytest.importorskip("plotly")
    from matplotlib.colors import to_rgb

    from harness.report.plots import method_color

    _, reports, written = report
    seen = browse(written["index.html"], EXPLORER_PROBE, "explorer", tmp_path, "--virtual-time-budget=10000")
    assert "error" not in seen, seen
    first, by_mmlu, by_cost = seen["steps"]
    # traces: base model, full FT, LoRA; each point filled with its method's colour
    for trace, method in zip(first["points"], ("base", "full", "lora")):
        rgb = "rgb({}, {}, {})".format(*(round(c * 255) for c in to_rgb(method_color(method))))
        assert {fill for _, fill in trace} <= {rgb}, (method, trace)
    # peak memory x in-domain accuracy: 6 points (the base model trained nothing, no peak memory)
    assert first["titles"] == ["peak training memory (GiB)", "in-domain accuracy (%)"]
    assert [len(t) for t in first["points"]] == [0, 3, 3]
    # x: MMLU accuracy: every ok run has one, so 7 points; the LoRA seeds (1, 2, 3 GiB apart before, all
    # at 70% MMLU now) move to one x, their y (65, 70, 75% in-domain) stays
    assert by_mmlu["titles"] == ["MMLU accuracy (%)", "in-domain accuracy (%)"]
    assert [len(t) for t in by_mmlu["points"]] == [1, 3, 3]
    xy = lambda p: tuple(float(v) for v in re.findall(r"[-\d.]+", p[0]))
    before, after = [xy(p) for p in first["points"][2]], [xy(p) for p in by_mmlu["points"][2]]
    assert len({x for x, _ in before}) == 3 and len({x for x, _ in after}) == 1
    assert [y for _, y in before] == [y for _, y in after]
    # y: cost: the three LoRA seeds cost the same, so they now sit on one point; the base model has none
    assert by_cost["titles"] == ["MMLU accuracy (%)", "cost per run (¢)"]
    assert [len(t) for t in by_cost["points"]] == [0, 3, 3] and len({xy(p) for p in by_cost["points"][2]}) == 1
    # hover: the run's settings
    assert all(f"{k}: " in seen["hover"] for k in ("method", "rank", "seed", "lr", "run_id", "model", "data",
                                                    "hardware")), seen["hover"]
    assert "LoRA" in seen["hover"] and "seed: 1" in seen["hover"]


def test_cpu_memory_shows_the_process_at_train_start_and_one_run_is_marked(tmp_path):
    """On a CPU the RSS peak is mostly the process itself at small sizes: the cell splits it into
    the RSS at train start and what training added, beside the tracked tensors; a time from one
    run says it is one measurement."""
    results = tmp_path / "r"
    make_record(results, "full", memory_device="cpu", memory_measure="CPU RSS", peak_memory_bytes=3 * GiB,
                peak_memory_growth_bytes=GiB, memory_breakdown_peak_bytes=512 * MiB, train_wall_s=90.0, cost_usd=0.01)
    table = _table(build_report(results, tmp_path / "out")["at-a-glance.md"].read_text())
    assert table["peak training memory"]["full FT"] == (
        "3.00 GiB = 2.00 GiB at train start + 1.00 GiB training growth (tracked tensors 512 MiB)")
    assert table["training wall-clock; cost per run"]["full FT"] == "90.0 s (1 run); $0.0100"


def test_a_sharded_arms_breakdown_says_it_is_one_ranks_shards(tmp_path):
    """Under FSDP2 (and ZeRO-3) "parameters" holds this rank's shards and the all-gathered weights
    land in "activations": the breakdown's tick says so, an unsharded arm's does not."""
    from matplotlib import rc_context

    from harness.records import load_records
    from harness.report.plots import STYLE, plot_memory_breakdown
    from harness.report.tables import group

    results = tmp_path / "r"
    parts = {"parameters": GiB, "gradients": GiB, "optimizer_state": GiB, "activations": GiB, "other": 0}
    make_record(results, "full", memory_breakdown_bytes=parts)
    rec = make_record(results, "lora", rank=8, memory_breakdown_bytes=parts)
    rec["config"]["distributed"] = {"strategy": "fsdp", "num_processes": 2}
    write_record(results, rec)
    with rc_context(STYLE):
        fig = plot_memory_breakdown(group(load_records(results), results))
    # another strategy is another table: one panel each
    panels = {tuple(t.get_text() for t in ax.get_xticklabels()): ax.get_ylabel() for ax in fig.axes if ax.get_visible()}
    assert panels == {("full FT",): "training memory (GiB)",
                      ("LoRA r=8\n(fsdp: one rank's shards;\ngathered weights in activations)",):
                      "training memory (GiB), largest rank"}


def test_a_killed_run_is_counted_as_killed_never_as_did_not_fit(tmp_path):
    """status killed, and an older oom record of an exit -9 (failure.was_killed): the header, the
    provenance, arms.csv and the verdict call it killed, not out of memory."""
    import csv

    results = tmp_path / "r"
    make_record(results, "full", indomain_correct=_answers(60))
    make_record(results, "lora", rank=8, indomain_correct=_answers(60))
    make_record(results, "lora", rank=8, seed=1, status="killed", error="killed by SIGKILL (likely ...)")
    make_record(results, "qlora", rank=8, status="oom", error="job process exited with code -9 (in phase train)")
    written = build_report(results, tmp_path / "out")
    md = written["at-a-glance.md"].read_text()
    assert "LoRA r=8 (1 of 2 ok; 1 killed)" in md and "4 runs (2 ok, 2 killed)" in md
    rows = {r["arm"]: r for r in csv.DictReader(written["arms.csv"].open())}
    assert (rows["QLoRA r=8"]["n_oom"], rows["QLoRA r=8"]["n_killed"]) == ("0", "1")
    verdict = json.loads(written["verdict.json"].read_text())["tables"][0]
    assert {a["label"]: a["judgement"] for a in verdict["arms"]}["QLoRA r=8"] == "killed"
