"""A short paired run scored on the committed MMLU fixture: the whole path, on any machine."""

from conftest import MMLU_FIXTURE, TINY, harness_run

from harness import records


def test_paired_run_on_the_mmlu_fixture_scores_every_arm_on_the_same_questions(tmp_path):
    results, reports = tmp_path / "results", tmp_path / "reports"
    tiny = [a for a in TINY if a not in ("eval.mmlu.enabled=false", "report=false")]
    proc = harness_run("-m", "method=full,lora", *tiny, "eval.on_random_weights=true", "eval.mmlu.enabled=true",
                       f"eval.mmlu.dir={MMLU_FIXTURE}", "eval.mmlu.num_fewshot=1", "eval.latency.enabled=false",
                       "isolate=false", f"results_dir={results}", f"reports_dir={reports}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    recs = {r["method"]: r for r in records.load_records(results)}
    assert sorted(recs) == ["base", "full", "lora"] and all(r["status"] == "ok" for r in recs.values())
    questions = {}
    for method, rec in recs.items():
        m = rec["metrics"]
        assert m["mmlu_n"] == 16 and m["mmlu_subset"] is True and m["mmlu_num_fewshot"] == 1
        assert set(m["mmlu_category_n"].values()) == {4}  # one fixture subject per MMLU category
        items = [it for it in records.read_items(results, rec) if it["task"] == "mmlu"]
        questions[method] = sorted(it["id"] for it in items)
        assert m["mmlu_acc"] == sum(it["correct"] for it in items) / 16
    assert questions["base"] == questions["full"] == questions["lora"]
    table = (reports / "at-a-glance.md").read_text()
    gap_row = next(line for line in table.splitlines() if line.startswith("| gap vs full FT, MMLU"))
    assert " pp [" in gap_row  # the LoRA arm's paired gap with its interval, computed from the 16 questions
