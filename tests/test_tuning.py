"""tune=lr: each method over its own learning-rate grid, the rate chosen on validation only, best
against best (harness.tuning, harness.report.tuned)."""

import pytest
from conftest import TINY, harness_run
from test_preflight import one_error_line

from harness import records
from harness.plan import preflight
from harness.records import run_id_for, stable_hash, write_items, write_record
from harness.report import build_report
from harness.report.tables import group
from harness.report.tuned import choices

TUNED = [*TINY, "data.n_validation=16"]


def test_a_tuned_sweep_plans_grid_x_methods_x_seeds_and_reuses_fixed_rate_runs(tmp_path):
    jobs = preflight(["-m", "method=full,lora", "tune=lr", "seed=0,1", *TUNED, f"results_dir={tmp_path}"])
    assert len(jobs) == 2 * 3 * 2
    rates = {(j["method"], j["config"]["method"]["learning_rate"]) for j in jobs}
    assert rates == {("full", 3e-5), ("full", 1e-4), ("full", 3e-4), ("lora", 3e-4), ("lora", 1e-3), ("lora", 3e-3)}
    assert len({j["run_id"] for j in jobs}) == 12
    # a tuned job at LoRA's default rate is the fixed-rate run: same run id, skipped on a rerun
    fixed = preflight(["method=lora", *TUNED, f"results_dir={tmp_path}"])[0]
    assert fixed["run_id"] in {j["run_id"] for j in jobs}
    # a grid of one's own, for every method of the sweep
    own = preflight(["-m", "method=full,lora", "tune=lr", "method.lr_grid=[1e-5,1e-4,1e-3]", *TUNED])
    assert sorted({j["config"]["method"]["learning_rate"] for j in own}) == [1e-5, 1e-4, 1e-3]


def test_the_plan_line_names_arms_not_methods(tmp_path):
    from harness.tuning import plan_note

    # lora-attention is method "lora" at r=42: the line must not read "full, lora" for three arms
    jobs = preflight(["-m", "method=full,lora,lora-attention", "tune=lr", *TUNED, f"results_dir={tmp_path}"])
    assert len(jobs) == 9
    note = plan_note(jobs, str(tmp_path))
    assert note.startswith("tune=lr: 9 jobs (full FT, LoRA r=16, LoRA r=42 over their method.lr_grid, 1 seed)")


@pytest.mark.parametrize("args,says", [
    (["method.lr_grid=[1e-3,3e-3]"], "has 2 rate(s); give at least 3"),
    (["method.lr_grid=[3e-3,1e-3,3e-4]"], "is not increasing"),
    (["method.lr_grid=[1e-4,3e-4,1e-3,3e-3]"], "add tune.point=0,1,2,3"),
    (["method.learning_rate=0.01"], "is set with tune=lr"),
    (["tune.point=0,1,2,3"], "tune.point=3 is outside method.lr_grid"),
])
def test_a_bad_grid_is_one_line_and_exit_2(tmp_path, args, says):
    proc = harness_run("-m", "method=lora", "tune=lr", *TUNED, f"results_dir={tmp_path / 'r'}", *args)
    assert says in one_error_line(proc)
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------- selection, on synthetic records


def _record(results, method: str, lr: float, seed: int, validation: int, test: int, n: int = 100,
            nll: float | None = None, rank: int = 16, trainable: int = 10**4, **method_settings) -> dict:
    """An ok record of ``method`` at ``lr``: ``validation`` of n validation and ``test`` of n
    in-domain questions right (the first ones), per-question answers beside it; ``nll``: 10
    held-out examples of 10 tokens at that summed NLL each."""
    rank = None if method == "full" else rank
    config = {"model": {"name": "m"}, "data": {"name": "demo"}, "seed": seed, "eval": {},
              "hardware": {"name": "h200"},
              "method": {"name": method, "r": rank, "learning_rate": lr, **method_settings},
              "tune": {"name": "lr", "point": 0}}
    config_hash = stable_hash({**config, "tune": None})
    run_id = run_id_for(method, rank, config_hash)
    items = [{"task": task, "id": f"{task}-{i}", "target": 1, "pred": int(i < right), "correct": i < right}
             for task, right in (("validation_indomain", validation), ("indomain", test)) for i in range(n)]
    items += [{"task": "heldout_loss", "id": f"h-{i}", "nll": nll + 0.1 * i, "n_tokens": 10}
              for i in range(10 if nll is not None else 0)]
    metrics = {"validation_indomain_acc": validation / n, "validation_indomain_stderr": 0.04,
               "validation_indomain_n": n, "indomain_acc": test / n, "indomain_stderr": 0.04, "indomain_n": n,
               "heldout_loss": None if nll is None else (nll + 0.45) / 10,
               "mmlu_acc": None, "mmlu_stderr": None, "mmlu_n": None, "total_params": 10**6,
               "trainable_params": 10**6 if method == "full" else trainable, "peak_memory_bytes": None, "train_wall_s": None,
               "tokens_per_s": None, "train_tokens": None, "cost_usd": None}
    rec = {"schema": 1, "run_id": run_id, "config_hash": config_hash,
           "pair_key": stable_hash({"model": "m", "seed": seed}), "eval_key": "e", "status": "ok", "error": None,
           "method": method, "rank": rank, "model": {"name": "m", "total_params": 10**6}, "config": config,
           "env": {"device": "cuda", "device_name": "NVIDIA H200", "device_count": 1,
                   "started_at": "2026-12-01T10:00:00+00:00", "ended_at": "2026-12-01T10:05:00+00:00"},
           "items_file": write_items(results, run_id, items), "base_run_id": None, "metrics": metrics}
    write_record(results, rec)
    return rec


# (rate, validation right, test right) of 100: validation and test disagree on the best rate
GRIDS = {"full": [(3e-5, 60, 95), (1e-4, 80, 70), (3e-4, 70, 60)],
         "lora": [(3e-4, 55, 90), (1e-3, 65, 60), (3e-3, 85, 65)]}


@pytest.fixture
def tuned_results(tmp_path):
    for method, grid in GRIDS.items():
        for lr, val, test in grid:
            for seed in (0, 1):
                _record(tmp_path, method, lr, seed, val, test)
    return tmp_path


def test_the_choice_follows_validation_not_the_test_split(tuned_results):
    (table,) = group(records.load_records(tuned_results), tuned_results)
    found = {c.method: c for c in choices(table.arms, table.items)}
    # test would pick full 3e-5 (95%) and LoRA 3e-4 (90%); validation picks 1e-4 and 3e-3
    assert found["full"].rate == 1e-4 and found["lora"].rate == 3e-3
    assert found["full"].runner_up[0] == 3e-4 and found["lora"].runner_up[0] == 1e-3
    # 80 vs 70 and 85 vs 65 of 100 on the same questions, twice: beyond the noise
    assert found["full"].runner_up_diff["diff"] == pytest.approx(0.10) and found["full"].within_noise is False
    assert not found["full"].edge and found["lora"].edge  # LoRA's best is its highest rate
    # every gap in the table is against the chosen full FT: LoRA 3e-3 (65%) - full 1e-4 (70%)
    lora = next(a for a in table.arms if a.method == "lora" and a.ok[0]["config"]["method"]["learning_rate"] == 3e-3)
    assert table.gaps[(lora.key, "indomain")]["gap"] == pytest.approx(-0.05)


def test_the_report_has_the_tuned_table_beside_the_fixed_rate_one_and_warns_at_the_edge(tuned_results, tmp_path):
    written = build_report(tuned_results, tmp_path / "reports")
    md = written["at-a-glance.md"].read_text()
    assert md.index("## m on demo") < md.index("### Tuned: each method at its best rate on validation")
    tuned = md[md.index("### Tuned"):]
    assert "| LoRA r=16 | 0.0003, 0.001, 0.003 | 0.003: acc 85.0% [" in tuned
    assert "lr 0.001: +20.00 pp [" in tuned and "beyond the noise" in tuned
    assert "| -5.00 pp [" in tuned  # the chosen LoRA against the chosen full FT, paired
    assert "LoRA r=16: the chosen rate 0.003 is at the edge of the grid (0.0003–0.003): extend the grid" in tuned
    assert "LoRA r=16 / full FT chosen rates: 0.003 / 0.0001 = 30× (published: about 10×)" in tuned
    # the fixed-rate table still has every arm, one column per rate
    header = next(line for line in md.splitlines() if line.startswith("|  | "))
    assert header.count("lr ") == 6
    assert "validation_vs_lr.png" in written
    html = written["index.html"].read_text()
    assert "Tuned: each method at its best rate on validation" in html and "extend the grid" in html


def test_a_tie_on_validation_goes_to_the_grid_middle_and_says_so(tmp_path):
    # a saturated validation split: full FT's 3e-5 and 1e-4 both answer all 100 (the demo's case)
    for method, grid in {"full": [(3e-5, 100, 90), (1e-4, 100, 92), (3e-4, 95, 80)],
                         "lora": [(3e-4, 50, 50), (1e-3, 100, 91), (3e-3, 30, 30)]}.items():
        for lr, val, test in grid:
            _record(tmp_path, method, lr, 0, val, test)
    (table,) = group(records.load_records(tmp_path), tmp_path)
    found = {c.method: c for c in choices(table.arms, table.items)}
    # ranked by rate first, the tie went to 3e-5, at the grid's edge
    assert found["full"].rate == 1e-4 and found["full"].tied == [3e-5, 1e-4] and not found["full"].edge
    assert found["full"].runner_up[0] == 3e-5 and found["full"].within_noise is True
    assert found["lora"].tied == []
    md = build_report(tmp_path, tmp_path / "reports")["at-a-glance.md"].read_text()
    assert "full FT: rates 3e-05, 0.0001 tie on validation (acc 100.0% [" in md
    assert "the one nearest the grid's middle is taken" in md and "full FT: the chosen rate" not in md


def test_the_verdict_judges_each_grid_at_its_chosen_rate_against_the_chosen_full_ft(tmp_path):
    from harness.report.verdict import Limits, table_verdict

    # on test, LoRA 3e-4 (95 of 100) beats the chosen 1e-3 (80): the verdict must not pick it
    for method, grid in {"full": [(3e-5, 60, 70, 30), (1e-4, 90, 96, 20), (3e-4, 70, 99, 10)],
                         "lora": [(3e-4, 50, 95, 25), (1e-3, 85, 80, 25), (3e-3, 40, 30, 25)]}.items():
        for lr, val, test, nll in grid:
            for seed in (0, 1):
                _record(tmp_path, method, lr, seed, val, test, nll=nll)
    (table,) = group(records.load_records(tmp_path), tmp_path)
    # held-out loss gaps too are against the chosen full FT (1e-4: 20 nats per 10 tokens), not missing
    lora = next(a for a in table.arms if a.label == "LoRA r=16 lr 0.001")
    assert table.loss_gaps[lora.key]["gap"] == pytest.approx(0.5)
    v = table_verdict(table, Limits(max_gap=30.0), tmp_path)
    assert v["full"]["label"] == "full FT lr 0.0001"  # validation's choice, not the first full arm
    by_label = {a["label"]: a for a in v["arms"]}
    assert by_label["LoRA r=16 lr 0.0003"]["judgement"] == "not chosen"
    assert by_label["LoRA r=16 lr 0.0003"]["note"] == "not judged: validation chose lr 0.001 (docs/tuning.md)"
    assert by_label["LoRA r=16 lr 0.003"]["judgement"] == "not chosen"
    chosen = by_label["LoRA r=16 lr 0.001"]
    assert chosen["gap_pp"] == pytest.approx(-16.0) and chosen["judgement"] == "within"
    assert v["pick"] == "LoRA r=16 lr 0.001"
    # the main table: one full arm is the reference, the other rates say they are not
    md = build_report(tmp_path, tmp_path / "reports")["at-a-glance.md"].read_text()
    row = next(line for line in md.splitlines() if line.startswith("| gap vs full FT, in-domain"))
    assert row.count("not the reference: acc") == 2 and row.count("| reference: acc 96.0%") == 1


def test_two_lora_grids_at_matched_parameters_are_compared_at_their_chosen_rates(tmp_path):
    # experiment=lora-targets: all-linear r=16 against attention-only r=42, each over its grid
    for lr, val, test in [(3e-5, 60, 90), (1e-4, 90, 90), (3e-4, 70, 90)]:
        _record(tmp_path, "full", lr, 0, val, test)
    for lr, val, test in [(3e-4, 50, 50), (1e-3, 90, 85), (3e-3, 40, 40)]:
        _record(tmp_path, "lora", lr, 0, val, test, trainable=4_880_000, target_modules="all-linear")
    for lr, val, test in [(3e-4, 50, 50), (1e-3, 60, 60), (3e-3, 80, 75)]:
        _record(tmp_path, "lora", lr, 0, val, test, rank=42, trainable=4_840_000,
                target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    (table,) = group(records.load_records(tmp_path), tmp_path)
    assert sorted((c.rank, c.rate) for c in choices(table.arms, table.items) if c.method == "lora") == [
        (16, 1e-3), (42, 3e-3)]
    tuned = build_report(tmp_path, tmp_path / "reports")["at-a-glance.md"].read_text().split("### Tuned")[1]
    assert "LoRA r=16 and LoRA r=42 train 4.88M and 4.84M parameters (0.8% apart)" in tuned
    # 85 against 75 of the same 100 test questions: the paired difference, beyond the noise
    assert "LoRA r=16 − LoRA r=42 at their chosen rates, in-domain: +10.00 pp [" in tuned
    assert "(beyond the noise)" in tuned


def test_the_validation_plot_draws_each_method_in_its_colour(tuned_results):
    from matplotlib import rc_context
    from matplotlib.colors import to_rgb

    from harness.report.plots import STYLE, method_color, plot_validation_vs_lr

    tables = group(records.load_records(tuned_results), tuned_results)
    with rc_context(STYLE):
        fig = plot_validation_vs_lr(tables)
    handles, labels = fig.axes[0].get_legend_handles_labels()
    colours = {label: to_rgb(h.get_children()[0].get_color() if hasattr(h, "get_children") and h.get_children()
                             else h.get_color()) for h, label in zip(handles, labels)}
    assert colours["full FT"] == to_rgb(method_color("full")) and colours["LoRA r=16"] == to_rgb(method_color("lora"))
    assert "chosen rate: LoRA r=16" in colours


@pytest.mark.slow
def test_a_tuned_tiny_sweep_records_validation_figures_and_reports_best_against_best(tmp_path):
    results = tmp_path / "results"
    proc = harness_run("-m", "method=full,lora", "tune=lr", *TUNED, "eval.on_random_weights=true",
                       "eval.latency.enabled=false", "eval.variants.enabled=false", f"results_dir={results}",
                       f"reports_dir={tmp_path / 'reports'}", "report=true", timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "tune=lr: 6 jobs (full FT, LoRA r=16 over their method.lr_grid, 1 seed)" in proc.stdout
    recs = [r for r in records.load_records(results) if r["method"] != "base"]
    assert len(recs) == 6
    for r in recs:
        assert r["metrics"]["validation_indomain_n"] == 16 and r["metrics"]["indomain_n"] == 8
    md = (tmp_path / "reports" / "at-a-glance.md").read_text()
    assert "### Tuned: each method at its best rate on validation" in md


def test_the_gate_judges_a_tuned_sweep_best_against_best(tuned_results, tmp_path, capsys):
    import json

    from harness import check

    baseline = tmp_path / "tuned.json"
    argv = ["--baseline", str(baseline), "--results", str(tuned_results), "--metrics", "indomain"]
    assert check.main([*argv, "--update-baseline"]) == 2  # three full FT rates share each pair: which one?
    assert "several full fine-tuning runs share one pair" in capsys.readouterr().err
    assert check.main([*argv, "--tuned", "--update-baseline"]) == 0
    groups = json.loads(baseline.read_text())["groups"]
    assert len(groups) == 1 and "lora r16 lr 0.003 vs full lr 0.0001" in groups[0]["key"]
    assert groups[0]["gap"] == pytest.approx(-0.05)
    assert check.main([*argv, "--tuned"]) == 0  # the same results: no regression
