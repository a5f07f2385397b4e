"""Any lm-eval task beside MMLU: your own task YAML on local data, offline, paired across arms."""

import json

import pytest
from conftest import planned
from test_data_runs import BASE

from harness import job, records


def my_task(tmp_path, name="my_capitals"):
    """A multiple-choice lm-eval task YAML over a local JSONL file (dataset_path: json)."""
    rows = [{"q": f"Which letter is number {i % 4 + 1}?", "options": ["A", "B", "C", "D"], "label": i % 4}
            for i in range(12)]
    data = tmp_path / "questions.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    folder = tmp_path / "my_tasks"
    folder.mkdir()
    (folder / f"{name}.yaml").write_text(f"""task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{q}}}}\\nAnswer:"
doc_to_choice: "{{{{options}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""")
    return folder


@pytest.mark.slow
def test_a_local_task_yaml_runs_offline_for_every_arm_and_the_report_pairs_its_gap(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from harness.report import build_report

    folder = my_task(tmp_path)
    results = tmp_path / "results"
    recs = {m: job.execute(planned(f"method={m}", *BASE, "eval.tasks=[my_capitals]", f"eval.include_path={folder}",
                                   f"results_dir={results}"))
            for m in ("full", "lora")}
    for rec in recs.values():
        assert rec["status"] == "ok", rec["error"]
        task = rec["metrics"]["tasks"]["my_capitals"]
        assert task["n"] == 12 and 0 <= task["acc"] <= 1 and task["metric"] == "acc"
        assert "gain_vs_base" in task
    base = records.find_ok(results, recs["full"]["base_run_id"])
    assert base["metrics"]["tasks"]["my_capitals"]["n"] == 12
    ids = {m: sorted(it["id"] for it in records.read_items(results, r) if it["task"] == "my_capitals")
           for m, r in recs.items()}
    assert ids["full"] == ids["lora"] and len(ids["full"]) == 12  # the same questions: a paired gap
    table = (build_report(results, tmp_path / "reports")["at-a-glance.md"]).read_text()
    (row,) = [line for line in table.splitlines() if line.startswith("| gap vs full FT, my_capitals")]
    cells = [c.strip() for c in row.strip("|").split("|")]
    gap = recs["lora"]["metrics"]["tasks"]["my_capitals"]["acc"] - recs["full"]["metrics"]["tasks"]["my_capitals"]["acc"]
    assert cells[2].startswith("reference: ") and cells[3].startswith(f"{gap * 100:+.2f}"), cells


@pytest.mark.slow  # indexes lm-eval's registry (about 15 s on 2 cores) to suggest the closest names
def test_an_unknown_task_is_a_usage_error_naming_the_closest(tmp_path):
    from harness.config import UsageError
    from harness.plan import check_inputs

    cfg = planned(*BASE, "eval.tasks=[arc_esy]", f"results_dir={tmp_path}")["config"]
    with pytest.raises(UsageError, match=r"eval.tasks: 'arc_esy' is not an lm-eval task; closest: arc_easy"):
        check_inputs(cfg)


def test_an_include_path_that_is_not_a_folder_is_a_usage_error(tmp_path):
    from harness.config import UsageError
    from harness.plan import check_inputs

    cfg = planned(*BASE, "eval.tasks=[x]", f"eval.include_path={tmp_path / 'nope'}", f"results_dir={tmp_path}")
    with pytest.raises(UsageError, match="is not a folder of lm-eval task YAMLs"):
        check_inputs(cfg["config"])
