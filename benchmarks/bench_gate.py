"""The CI gate's operating characteristics, simulated from the real ci-smoke per-question answers.

    python -m benchmarks.bench_gate [--baseline results/baselines/ci-smoke.json] [--trials 4000]
                                    [--baseline-seeds K] [--current-seeds 1] [--z 2.0] [--floor-pp 1.0]

Input: the committed baseline's answers file (every seed's per-question answers of LoRA and full
FT on the ci-smoke held-out questions). A synthetic seed is built from them: each question's
(LoRA, full) answer pair is taken from the seed's *anchor* (a real seed drawn per synthetic seed)
with probability rho, else from a real seed drawn per question. rho = 0 gives question-level flips
only; rho = 1 replays whole real seeds (all their training noise). rho is calibrated so that the
synthetic seeds' gap variance matches the real seeds' (printed). Each trial draws a baseline of
``--baseline-seeds`` synthetic seeds (default: as many as the committed baseline has) and a
current run of ``--current-seeds`` (default 1, as CI runs), and asks the gate
(harness.check.change_and_variance and tolerance, the code CI runs):

    false alarms   current drawn like the baseline (nothing changed but the seeds)
    detection      the current run's LoRA arm made wrong on round(d * n) more questions that it
                   answered right (a regression of d = 3, 5, 10 pp), the full arm unchanged

Also printed: the smallest regression (in whole questions) caught at least 95% of the time, and
the leave-one-out check on the real seeds only (baseline = real seeds less one,
current = the one left out), which needs no model of the noise but has few combinations.
Targets (issue 11): false alarms <= 5%, a 10 pp regression caught >= 95% of the time.
"""

from __future__ import annotations

import argparse
import itertools
import random
from pathlib import Path

from harness.check import change_and_variance, load_baseline, tolerance

REGRESSIONS_PP = (3, 5, 10)


def synthetic_seed(real: list[dict], rho: float, rng: random.Random) -> dict:
    n = len(real[0]["peft"])
    anchor = rng.choice(real)
    out = {"peft": [], "full": []}
    for i in range(n):
        src = anchor if rng.random() < rho else rng.choice(real)
        out["peft"].append(src["peft"][i])
        out["full"].append(src["full"][i])
    return out


def gap(seed: dict) -> float:
    return sum(int(p) - int(f) for p, f in zip(seed["peft"], seed["full"])) / len(seed["peft"])


def variance(values: list[float]) -> float:
    mean = sum(values) / len(values)
    return sum((v - mean) ** 2 for v in values) / (len(values) - 1)


def calibrate(real: list[dict], rng: random.Random, draws: int = 400) -> tuple[float, float, float]:
    """(rho, synthetic gap variance, real gap variance): rho on a 0.05 grid, closest variance."""
    target = variance([gap(s) for s in real])
    best = None
    for step in range(21):
        rho = step / 20
        v = variance([gap(synthetic_seed(real, rho, rng)) for _ in range(draws)])
        if best is None or abs(v - target) < abs(best[1] - target):
            best = (rho, v)
    return best[0], best[1], target


def regress(seed: dict, pp: float, rng: random.Random) -> dict:
    """The seed with its LoRA arm wrong on round(pp/100 * n) more questions it had right."""
    n = len(seed["peft"])
    right = [i for i, c in enumerate(seed["peft"]) if c]
    flip = set(rng.sample(right, min(len(right), round(pp / 100 * n))))
    return {"peft": [c and i not in flip for i, c in enumerate(seed["peft"])], "full": list(seed["full"])}


def judge(base: list[dict], cur: list[dict], z: float, floor_pp: float) -> bool:
    """True when the gate calls a regression."""
    as_group = lambda seeds: {"answers": {str(i): s for i, s in enumerate(seeds)}}
    change, var, _ = change_and_variance(as_group(base), as_group(cur))
    return change < -tolerance(var, floor_pp, z)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline", type=Path, default=Path("results/baselines/ci-smoke.json"))
    p.add_argument("--trials", type=int, default=4000)
    p.add_argument("--baseline-seeds", type=int, default=None)
    p.add_argument("--current-seeds", type=int, default=1)
    p.add_argument("--z", type=float, default=2.0)
    p.add_argument("--floor-pp", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    rng = random.Random(args.seed)

    baseline = load_baseline(args.baseline)
    for group in baseline["groups"]:
        real = [group["answers"][s] for s in sorted(group["answers"])]
        n = group["n"]
        print(f"{group['key']} {group['metric']}: {len(real)} real seeds x {n} questions; "
              f"real gaps {', '.join(f'{100 * gap(s):+.1f}' for s in real)} pp")
        if len(real) < 2:
            print("  needs at least 2 real seeds to simulate training noise")
            continue
        rho, v_syn, v_real = calibrate(real, rng)
        print(f"  calibrated rho {rho:.2f}: synthetic gap sd {100 * v_syn**0.5:.2f} pp vs real {100 * v_real**0.5:.2f} pp")
        K, k = args.baseline_seeds or len(real), args.current_seeds
        alarms = {0: 0, **dict.fromkeys(REGRESSIONS_PP, 0)}
        for _ in range(args.trials):
            base = [synthetic_seed(real, rho, rng) for _ in range(K)]
            cur = [synthetic_seed(real, rho, rng) for _ in range(k)]
            alarms[0] += judge(base, cur, args.z, args.floor_pp)
            for pp in REGRESSIONS_PP:
                alarms[pp] += judge(base, [regress(c, pp, rng) for c in cur], args.z, args.floor_pp)
        print(f"  gate z={args.z} floor={args.floor_pp} pp, baseline {K} seeds, current {k} seed(s), "
              f"{args.trials} trials:")
        print(f"    false alarms (nothing changed but the seed): {100 * alarms[0] / args.trials:.1f}%")
        for pp in REGRESSIONS_PP:
            print(f"    detection, {pp:>2} pp regression ({round(pp / 100 * n)} questions): "
                  f"{100 * alarms[pp] / args.trials:.1f}%")
        # the smallest regression caught >= 95% of the time (in whole questions)
        for q in range(1, n + 1):
            pp = 100 * q / n
            caught = 0
            for _ in range(args.trials // 4):
                base = [synthetic_seed(real, rho, rng) for _ in range(K)]
                cur = [regress(synthetic_seed(real, rho, rng), pp, rng) for _ in range(k)]
                caught += judge(base, cur, args.z, args.floor_pp)
            if caught >= 0.95 * (args.trials // 4):
                print(f"    smallest regression caught >= 95% of the time: {q} questions ({pp:.1f} pp; "
                      f"{100 * caught / (args.trials // 4):.1f}% of {args.trials // 4} trials)")
                break
        if len(real) > 2:
            L = min(K, len(real) - 1)
            combos = [(list(b), [s]) for s in real for b in itertools.combinations([r for r in real if r is not s], L)]
            fa = sum(judge(b, c, args.z, args.floor_pp) for b, c in combos)
            det = sum(judge(b, [regress(c[0], 10, rng)], args.z, args.floor_pp) for b, c in combos)
            print(f"  leave-one-out on the real seeds (baseline {L}, current 1: {len(combos)} combinations): false alarms {fa}, "
                  f"10 pp regressions caught {det}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
