"""Learning-rate tuning: every method at each rate of its own ``method.lr_grid`` (``tune=lr``).

The sweep runs ``tune.point`` over the grid's positions (conf/tune/lr.yaml) and each job's
``method.learning_rate`` is the grid's rate there (the ``grid_point`` resolver, in harness.config), so a tuned job is
an ordinary run: its own run id, skipped on a rerun, the same run as a fixed-rate one at that
rate. The rate is chosen per method on the validation split, never on the test figures
(``harness.report.tuned``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from harness.config import grid_point

MIN_GRID = 3  # rates a grid needs: a best point with a neighbour on each side, or an edge to flag


def check_job(cfg: dict) -> str | None:
    """One line naming what is wrong with a job's grid or tuning settings, else None."""
    method, tune = cfg["method"], cfg["tune"]
    grid = [float(r) for r in method["lr_grid"]]
    if len(grid) < MIN_GRID:
        return (f"method.lr_grid={grid} has {len(grid)} rate(s); give at least {MIN_GRID}, log-spaced, "
                f"e.g. [3e-4,1e-3,3e-3]")
    if any(b <= a for a, b in zip(grid, grid[1:])):
        return f"method.lr_grid={grid} is not increasing; give the rates from lowest to highest"
    if tune["name"] == "lr" and float(method["learning_rate"]) != grid_point(grid, tune["point"]):
        return (f"method.learning_rate={method['learning_rate']} is set with tune=lr, which takes each rate "
                f"from method.lr_grid; give one of the two")
    return None


def _group(job: dict) -> tuple:
    """A tuned job's method and everything but its rate (what one grid sweeps)."""
    import json

    cfg = job["config"]
    method = {k: v for k, v in cfg["method"].items() if k != "learning_rate"}
    return job["method"], job["rank"], json.dumps(method, sort_keys=True, default=str), job["pair_key"]


def check_sweep(jobs: Iterable[dict]) -> str | None:
    """Under tune=lr every method's sweep covers its whole grid: the points swept are 0..len-1."""
    points: dict[tuple, set] = defaultdict(set)
    sizes: dict[tuple, int] = {}
    for job in jobs:
        cfg = job["config"]
        if cfg["tune"]["name"] != "lr":
            continue
        key = _group(job)
        points[key].add(int(cfg["tune"]["point"]))
        sizes[key] = len(cfg["method"]["lr_grid"])
    for key, seen in points.items():
        if seen != set(range(sizes[key])):
            missing = sorted(set(range(sizes[key])) - seen)
            return (f"tune=lr runs {key[0]} at tune.point {sorted(seen)} but its method.lr_grid has {sizes[key]} "
                    f"rates (missing {missing}); add tune.point={','.join(map(str, range(sizes[key])))}")
    return None


def plan_note(jobs: list[dict], results_dir: str) -> str | None:
    """``tune=lr: 18 jobs (...); expected ~42 min from 6 earlier runs of this setting`` for a tuned sweep."""
    from harness import identity, records

    tuned = [j for j in jobs if j["config"]["tune"]["name"] == "lr"]
    if not tuned:
        return None
    from harness.identity import arm_label

    # arms, not method names: lora-attention is method "lora" at another rank and target set
    arms = list(dict.fromkeys(arm_label(j["method"], j["rank"]) for j in tuned))
    seeds = sorted({j["config"]["seed"] for j in tuned})
    text = (f"tune=lr: {len(jobs)} jobs ({', '.join(arms)} over their method.lr_grid, "
            f"{len(seeds)} seed{'s' if len(seeds) > 1 else ''})")
    settings = {identity.setting_key(j["config"]) for j in jobs}
    walls: dict[str, list[float]] = defaultdict(list)
    for rec in records.load_records(results_dir):
        if rec.get("status") == "ok" and identity.setting_key(rec["config"]) in settings:
            if (wall := (rec.get("metrics") or {}).get("run_wall_s")) is not None:
                walls[arm_label(rec["method"], rec.get("rank"))].append(float(wall))
    todo = [j for j in jobs if not records.find_ok(j["config"]["results_dir"], j["run_id"])]
    arm_of = {j["run_id"]: arm_label(j["method"], j["rank"]) for j in jobs}
    if todo and all(walls.get(arm_of[j["run_id"]]) for j in todo):
        expected = sum(sum(walls[arm_of[j["run_id"]]]) / len(walls[arm_of[j["run_id"]]]) for j in todo)
        n = sum(len(v) for v in walls.values())
        text += f"; {len(todo)} to run, expected ~{expected / 60:.0f} min from {n} earlier runs of this setting"
    return text
