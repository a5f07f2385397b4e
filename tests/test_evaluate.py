"""MMLU from a local release folder, in-domain eval, and the category arithmetic."""

import pytest

from harness.data import make_demo
from harness.evaluate import CATEGORY_NAMES, EvalDataError, evaluate_indomain, evaluate_mmlu, mmlu_subjects, mmlu_tasks
from harness.models import load_model

TINY = {"name": "tiny-random", "source": "config", "arch": "tiny-random"}


def test_local_mmlu_folder_gives_one_task_per_subject(mmlu_dir):
    tasks, subject_of = mmlu_tasks({"dir": str(mmlu_dir)})
    assert len(mmlu_subjects()) == 57
    assert [t["task"] for t in tasks] == [f"mmlu_local_{s}" for s in ("astronomy", "marketing", "philosophy", "sociology")]
    astronomy = next(t for t in tasks if t["task"] == "mmlu_local_astronomy")
    assert astronomy["dataset_kwargs"]["data_files"]["test"].endswith("test/astronomy_test.csv")
    assert astronomy["fewshot_split"] == "dev"
    assert subject_of["mmlu_local_astronomy"] == "astronomy"


def test_missing_mmlu_folder_is_a_clear_error(tmp_path):
    with pytest.raises(EvalDataError, match="not an MMLU release folder"):
        mmlu_tasks({"dir": str(tmp_path)})


def test_hub_mmlu_is_lm_evals_own_task():
    tasks, subject_of = mmlu_tasks({"dir": None})
    assert tasks == ["mmlu"] and subject_of["mmlu_anatomy"] == "anatomy"


def test_mmlu_subset_scores_and_categories_add_up(mmlu_dir):
    loaded = load_model(TINY)
    metrics, items = evaluate_mmlu(loaded.model, loaded.tokenizer,
                                   {"dir": str(mmlu_dir), "limit": 3, "num_fewshot": 1, "batch_size": 16})
    # 4 subjects (one per category) x 3 questions; 4 of MMLU's 57 subjects: a subset
    assert metrics["mmlu_n"] == len(items) == 12 and metrics["mmlu_subset"] is True
    assert len({it["id"] for it in items}) == 12
    assert all(metrics["mmlu_category_n"][c] == 3 for c in CATEGORY_NAMES)
    # categories weighted by their question counts add back up to the overall accuracy
    n = metrics["mmlu_category_n"]
    weighted = sum(metrics["mmlu_categories"][c] * n[c] for c in CATEGORY_NAMES) / sum(n.values())
    assert weighted == pytest.approx(metrics["mmlu_acc"])
    assert metrics["mmlu_acc"] == sum(it["correct"] for it in items) / 12


def test_indomain_eval_on_the_demo_heldout_split(tmp_path):
    loaded = load_model(TINY)
    _, heldout, _ = make_demo(8, 12, seed=3)
    metrics, items = evaluate_indomain(loaded.model, loaded.tokenizer, heldout, {"batch_size": 8}, str(tmp_path))
    assert metrics["indomain_n"] == 12
    assert sorted(it["id"] for it in items) == sorted(r["id"] for r in heldout)
    by_id = {r["id"]: r for r in heldout}
    assert all(it["target"] == by_id[it["id"]]["answer"] for it in items)
    assert metrics["indomain_acc"] == sum(it["correct"] for it in items) / 12
