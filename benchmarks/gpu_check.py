"""The CUDA paths of the harness, checked in one command on a machine with a GPU (`make gpu-check`).

    python benchmarks/gpu_check.py [--out DIR] [--docs DIR] [--wheels DIR] [--steps N]
    python benchmarks/gpu_check.py --download-wheels DIR [--python 3.11 ...]   (`make gpu-wheels`)

What CPU tests cannot reach, on one GPU in about 5 minutes (one H200):

1. in-process: memory held before a phase counts in its peak but not in its growth (and a spike
   freed before it in neither); an evaluation peak after a freed training tensor reports only its
   own; the measured bf16 matmul peak lies between 60% and 100% of the datasheet figure;
2. a paired sweep full / LoRA / QLoRA through ``harness-run`` on ``model=qwen2.5-0.5b-arch``
   (random weights, a few steps): each ok, priced, ``memory_measure`` "CUDA allocated"; reserved >=
   allocated; full > LoRA > QLoRA peaks; the breakdown sums to its peak; 0 < MFU <= 1; and
   ``harness-estimate`` of each config within +-30% of its measured allocated peak (printed);
3. FSDP2 at world size 1 for LoRA and QLoRA: ok, total parameters equal to step 2's;
4. with 2 GPUs or more: DDP and FSDP over 2 processes (NCCL gather of per-rank peaks), and step
   2's ``distributed=none`` jobs each on exactly one of the visible GPUs.

Every check is ``pass``, ``FAIL`` or ``NOT RUN`` (with why); the summary line names each check
not run, and a skipped check never reads as passed. Exit 0: every check ran and passed; 1: a
check failed; 2: nothing could run (no CUDA device, or the packages could not be imported); 3:
every check that ran passed, but some could not run (one GPU: the 2-GPU checks). With a GPU it
writes ``docs/gpu/<date>-<device>.md`` and ``.json``.

The GPU machine's image has torch and transformers but not the rest (``GPU_WHEELS``): ``make
gpu-wheels`` downloads them (the versions of constraints.txt, no dependencies) into
``.gpu-wheels/`` (at most 64 MiB), and this check installs from there (``pip install --no-index
--no-deps --find-links``) when an import fails.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WHEELS_DIR = ROOT / ".gpu-wheels"
WHEELS_LIMIT = 64 * 2**20
# (distribution, module it provides): what the harness imports on the paths below that an image
# with torch and transformers (numpy, huggingface_hub, tokenizers, safetensors, PyYAML, tqdm,
# requests, fsspec, jinja2) lacks. pyarrow (55 MB) and pandas, which datasets imports, are not in
# the folder: they would not fit in 64 MiB beside bitsandbytes (43 MB, every CUDA version's build).
GPU_WHEELS = (
    ("hydra-core", "hydra"),
    ("omegaconf", "omegaconf"),
    ("antlr4-python3-runtime", "antlr4"),  # hydra's parser; an sdist only: built into a wheel here
    ("datasets", "datasets"),
    ("dill", "dill"),
    ("multiprocess", "multiprocess"),
    ("xxhash", "xxhash"),
    ("lm_eval", "lm_eval"),
    ("bitsandbytes", "bitsandbytes"),
    ("peft", "peft"),
    ("accelerate", "accelerate"),
    ("psutil", "psutil"),
    ("filelock", "filelock"),
    ("cloudpickle", "cloudpickle"),
)
SDIST_ONLY = {"antlr4-python3-runtime"}
GPU_PYTHONS = ("3.11", "3.12", "3.13")  # the image's Python is not known here: small wheels for each
PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_24_x86_64", "manylinux_2_28_x86_64")

MODEL = "qwen2.5-0.5b-arch"
ARMS = ("full", "lora", "qlora")
TWO_GPU = "2-GPU: DDP, FSDP world 2, NCCL gather"
CHECKS = (
    "peak held before the phase: in the peak, not the growth",
    "eval peak after a freed training tensor: its own only",
    "bf16 matmul peak: 60-100% of the datasheet",
    "sweep full/LoRA/QLoRA: ok, priced, CUDA allocated",
    "sweep: reserved >= allocated",
    "sweep: full > LoRA > QLoRA peaks",
    "sweep: breakdown sums to its peak",
    "sweep: 0 < MFU <= 1",
    "harness-estimate within +-30% of the measured peak",
    "FSDP2 world 1, LoRA and QLoRA: ok, total parameters as step 2",
    TWO_GPU,
)
PASS, FAIL, NOT_RUN = "pass", "FAIL", "NOT RUN"
MIB = 2**20


# ---------------------------------------------------------------- the wheels


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pinned(constraints: Path = ROOT / "constraints.txt") -> dict[str, str]:
    """``{normalized name: version}`` of constraints.txt's ``name==version`` lines."""
    pins = {}
    for line in constraints.read_text().splitlines():
        name, sep, version = line.split("#")[0].strip().partition("==")
        if sep:
            pins[_norm(name)] = version.strip()
    return pins


def wheel_specs(constraints: Path = ROOT / "constraints.txt") -> list[str]:
    """``name==version`` of every GPU_WHEELS distribution, at constraints.txt's version."""
    pins = pinned(constraints)
    missing = [d for d, _ in GPU_WHEELS if _norm(d) not in pins]
    if missing:
        raise SystemExit(f"constraints.txt pins no version of {', '.join(missing)}")
    return [f"{d}=={pins[_norm(d)]}" for d, _ in GPU_WHEELS]


def download_wheels(dest: Path, pythons: tuple[str, ...] = GPU_PYTHONS) -> int:
    """``pip download`` every GPU wheel (no dependencies) for Linux x86_64 and each Python of
    ``pythons``; the sdist-only ones built into wheels. Fails over WHEELS_LIMIT."""
    dest.mkdir(parents=True, exist_ok=True)
    specs = wheel_specs()
    binary = [s for s in specs if s.partition("==")[0] not in SDIST_ONLY]
    platforms = [x for p in PLATFORMS for x in ("--platform", p)]
    for py in pythons:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", *platforms,
               "--python-version", py, "-d", str(dest), *binary]
        if subprocess.run(cmd).returncode:
            print(f"gpu-wheels: pip download for Python {py} failed", file=sys.stderr)
            return 1
    sdists = [s for s in specs if s.partition("==")[0] in SDIST_ONLY]
    if sdists and subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dest),
                                  *sdists]).returncode:
        print("gpu-wheels: building the sdist-only wheels failed", file=sys.stderr)
        return 1
    files = sorted(p for p in dest.iterdir() if p.is_file())
    total = sum(p.stat().st_size for p in files)
    for p in files:
        print(f"  {p.stat().st_size / MIB:7.1f} MiB  {p.name}")
    print(f"gpu-wheels: {len(files)} files, {total / MIB:.1f} MiB in {dest} (limit {WHEELS_LIMIT / MIB:.0f} MiB)")
    if total > WHEELS_LIMIT:
        print(f"gpu-wheels: {total / MIB:.1f} MiB is over the {WHEELS_LIMIT / MIB:.0f} MiB limit", file=sys.stderr)
        return 1
    return 0


def missing_modules() -> list[str]:
    """The GPU_WHEELS distributions whose module this Python cannot import."""
    return [d for d, module in GPU_WHEELS if importlib.util.find_spec(module) is None]


def ensure_imports(wheels: Path) -> str | None:
    """Install what is missing from ``wheels`` (no index, no dependencies); why not, or None."""
    missing = missing_modules()
    if not missing:
        return None
    if not wheels.is_dir() or not any(wheels.iterdir()):
        return f"cannot import {', '.join(missing)} and {wheels} holds no wheels (make gpu-wheels)"
    pins = pinned()
    specs = [f"{d}=={pins[_norm(d)]}" if _norm(d) in pins else d for d in missing]
    print(f"gpu-check: installing {', '.join(specs)} from {wheels}", flush=True)
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                           "--find-links", str(wheels), *specs], capture_output=True, text=True)
    importlib.invalidate_caches()
    still = missing_modules()
    if proc.returncode or still:
        return f"pip install from {wheels} failed (still missing: {', '.join(still) or 'none'}): {proc.stderr[-500:]}"
    return None


# ---------------------------------------------------------------- results


def result(name: str, status: str, **facts) -> dict:
    line = {"check": name, "status": status, **facts}
    print(json.dumps(line, default=str), flush=True)
    return line


def not_run(names, why: str) -> list[dict]:
    return [result(n, NOT_RUN, why=why) for n in names]


def summary(results: list[dict]) -> tuple[str, int]:
    """The summary line (every check not run named) and the exit code."""
    by = {s: [r["check"] for r in results if r["status"] == s] for s in (PASS, FAIL, NOT_RUN)}
    line = f"gpu-check: {len(by[PASS])} pass, {len(by[FAIL])} FAIL, {len(by[NOT_RUN])} NOT RUN"
    if by[FAIL]:
        line += "; FAIL: " + "; ".join(by[FAIL])
    if by[NOT_RUN]:
        line += "; " + "; ".join(f"{n}: NOT RUN" for n in by[NOT_RUN])
    if by[FAIL]:
        return line, 1
    if not by[PASS]:
        return line, 2
    return line, 3 if by[NOT_RUN] else 0


# ---------------------------------------------------------------- 1. in process


def in_process_checks(out: list[dict]) -> None:
    """Appends each check's result to ``out`` as it ends (a later one raising keeps the earlier)."""
    import torch

    from harness.measure import environment, memory, pricing
    from harness.measure.flops import measure_peak_flops

    dev = torch.device("cuda", 0)
    # memory held before the phase counts in its peak, not in its growth; a spike freed before the
    # phase in neither (reset_peak_memory_stats)
    held = torch.empty(256 * MIB, dtype=torch.uint8, device=dev)
    spike = torch.empty(1024 * MIB, dtype=torch.uint8, device=dev)
    del spike
    phase = memory.PhasePeak(dev).start()
    inside = torch.empty(128 * MIB, dtype=torch.uint8, device=dev)
    del inside
    peak = phase.stop()
    ok = (256 * MIB + 128 * MIB <= peak["peak"] < 256 * MIB + 128 * MIB + 64 * MIB
          and 128 * MIB <= peak["growth"] < 128 * MIB + 64 * MIB and peak["reserved"] >= peak["peak"])
    out.append(result(CHECKS[0], PASS if ok else FAIL, held_mib=256, spike_before_mib=1024, inside_mib=128,
                      peak_mib=peak["peak"] / MIB, growth_mib=peak["growth"] / MIB))
    del held
    # an evaluation peak after a freed training tensor: its own only
    train = memory.PhasePeak(dev).start()
    big = torch.empty(2048 * MIB, dtype=torch.uint8, device=dev)
    del big
    train_peak = train.stop()
    with memory.eval_peak_memory(dev) as ev:
        small = torch.empty(64 * MIB, dtype=torch.uint8, device=dev)
        del small
    ok = (ev["eval_peak_memory_growth_bytes"] < 128 * MIB and ev["eval_peak_memory_bytes"] < 1024 * MIB
          and train_peak["growth"] >= 2048 * MIB)
    out.append(result(CHECKS[1], PASS if ok else FAIL, train_tensor_mib=2048, eval_tensor_mib=64,
                      eval_peak_mib=ev["eval_peak_memory_bytes"] / MIB,
                      eval_growth_mib=ev["eval_peak_memory_growth_bytes"] / MIB))
    # the measured bf16 matmul peak against the datasheet of the preset this device matches
    entry = environment.detect_hardware(pricing.load_price_table(ROOT / "conf"))
    sheet = (entry or {}).get("datasheet_bf16_dense_tflops")
    if not sheet:
        out.append(result(CHECKS[2], NOT_RUN, why=f"no preset with a datasheet peak for {torch.cuda.get_device_name(0)!r}"))
    else:
        measured = measure_peak_flops(dev, torch.bfloat16, size=8192, reps=10)
        share = measured / (sheet * 1e12)
        out.append(result(CHECKS[2], PASS if 0.6 <= share <= 1.0 else FAIL, preset=entry["name"],
                          measured_tflops=round(measured / 1e12, 1), datasheet_tflops=sheet, share=round(share, 3)))
    torch.cuda.empty_cache()


# ---------------------------------------------------------------- 2-4. through harness-run


def run_args(steps: int) -> list[str]:
    return [f"model={MODEL}", "hardware=auto", f"train.max_steps={steps}", "train.batch_size=4",
            "train.seq_len=256", "data.n_train=64", "data.n_heldout=16", "eval.mmlu.enabled=false",
            "eval.latency.enabled=false", "report=false"]


def harness_run(results: Path, *args: str, timeout: int = 400) -> tuple[int, dict[str, dict], str]:
    """(exit code, records by method, the output's tail) of ``harness-run`` into ``results``."""
    try:
        proc = subprocess.run([sys.executable, "-m", "harness.run", *args, f"results_dir={results}"], cwd=ROOT,
                              capture_output=True, text=True, timeout=timeout)
        rc, tail = proc.returncode, proc.stdout[-1500:] + proc.stderr[-1500:]
    except subprocess.TimeoutExpired as exc:
        rc, tail = 124, f"timed out after {timeout} s: {str(exc.stdout or '')[-1000:]}"
    recs = {}
    for p in sorted(results.glob("*.json")):
        rec = json.loads(p.read_text())
        if rec.get("method") != "base":
            recs[rec["method"]] = rec
    return rc, recs, tail


def sweep_checks(out_dir: Path, steps: int) -> tuple[list[dict], dict[str, dict]]:
    from harness import estimate

    rc, recs, tail = harness_run(out_dir / "sweep", "-m", f"method={','.join(ARMS)}", *run_args(steps))
    m = {a: (recs.get(a) or {}).get("metrics") or {} for a in ARMS}
    got = all(a in recs for a in ARMS)
    out = []
    ok = got and all(recs[a]["status"] == "ok" and m[a].get("cost_usd") is not None
                     and m[a].get("memory_measure") == "CUDA allocated" for a in ARMS)
    out.append(result(CHECKS[3], PASS if ok else FAIL, exit_code=rc,
                      statuses={a: (recs.get(a) or {}).get("status") for a in ARMS},
                      cost_usd={a: m[a].get("cost_usd") for a in ARMS},
                      memory_measure={a: m[a].get("memory_measure") for a in ARMS},
                      errors={a: recs[a].get("error") for a in recs if recs[a].get("error")} or None,
                      tail=None if ok else tail))
    if not got:
        return out + not_run(CHECKS[4:9], f"the sweep left records for {sorted(recs)} only"), recs
    peaks = {a: m[a].get("peak_memory_bytes") or 0 for a in ARMS}
    reserved = {a: m[a].get("peak_memory_reserved_bytes") or 0 for a in ARMS}
    out.append(result(CHECKS[4], PASS if all(peaks[a] and reserved[a] >= peaks[a] for a in ARMS) else FAIL,
                      allocated_mib={a: peaks[a] / MIB for a in ARMS}, reserved_mib={a: reserved[a] / MIB for a in ARMS}))
    out.append(result(CHECKS[5], PASS if peaks["full"] > peaks["lora"] > peaks["qlora"] > 0 else FAIL,
                      peaks_mib={a: round(peaks[a] / MIB, 1) for a in ARMS}))
    sums = {a: (sum((m[a].get("memory_breakdown_bytes") or {}).values()), m[a].get("memory_breakdown_peak_bytes"))
            for a in ARMS}
    out.append(result(CHECKS[6], PASS if all(s == p and p for s, p in sums.values()) else FAIL,
                      breakdown_sum_and_peak=sums, breakdown={a: m[a].get("memory_breakdown_bytes") for a in ARMS}))
    mfus = {a: (m[a].get("mfu"), m[a].get("mfu_datasheet")) for a in ARMS}
    ok = all(x is not None and 0 < x <= 1 for a in ARMS for x in mfus[a][:1]) and all(
        0 < x <= 1 for a in ARMS for x in mfus[a][1:] if x is not None)
    out.append(result(CHECKS[7], PASS if ok else FAIL, mfu_and_datasheet_mfu=mfus))
    ratios = {}
    for a in ARMS:
        cfg = estimate.resolved(estimate.compose([f"method={a}", *[x for x in run_args(steps) if not x.startswith(
            ("eval.", "report=", "data."))]]))
        est = estimate.estimate_job(cfg)["peak_memory_bytes"]
        ratios[a] = round(est / peaks[a], 3) if peaks[a] else None
        print(f"  estimate {a}: {est / MIB:.0f} MiB against {peaks[a] / MIB:.0f} MiB measured "
              f"(allocated): {ratios[a]}x", flush=True)
    ok = all(r is not None and 0.7 <= r <= 1.3 for r in ratios.values())
    out.append(result(CHECKS[8], PASS if ok else FAIL, estimate_over_measured=ratios))
    return out, recs


def fsdp_check(out_dir: Path, steps: int, sweep: dict[str, dict]) -> list[dict]:
    rc, recs, tail = harness_run(out_dir / "fsdp1", "-m", "method=lora,qlora", "distributed=fsdp",
                                 "distributed.num_processes=1", *run_args(steps))
    facts = {a: {"status": (recs.get(a) or {}).get("status"), "world_size": ((recs.get(a) or {}).get("metrics") or {}).get(
        "world_size"), "total_params": ((recs.get(a) or {}).get("model") or {}).get("total_params"),
        "total_params_step2": ((sweep.get(a) or {}).get("model") or {}).get("total_params")} for a in ("lora", "qlora")}
    ok = all(f["status"] == "ok" and f["total_params"] and f["total_params"] == f["total_params_step2"]
             for f in facts.values())
    return [result(CHECKS[9], PASS if ok else FAIL, exit_code=rc, arms=facts,
                   errors={a: r.get("error") for a, r in recs.items() if r.get("error")} or None,
                   tail=None if ok else tail)]


def two_gpu_check(out_dir: Path, steps: int, sweep: dict[str, dict]) -> list[dict]:
    rc, recs, tail = harness_run(out_dir / "ddp", "method=lora", "distributed=ddp", "distributed.num_processes=2",
                                 *run_args(steps))
    rc2, recs2, tail2 = harness_run(out_dir / "fsdp2", "method=qlora", "distributed=fsdp",
                                    "distributed.num_processes=2", *run_args(steps))
    ddp, fsdp = recs.get("lora") or {}, recs2.get("qlora") or {}
    dm, fm = ddp.get("metrics") or {}, fsdp.get("metrics") or {}
    # distributed=none ran on exactly one of the visible GPUs (step 2's records)
    one_each = [(r.get("env") or {}).get("visible_device_count") for r in sweep.values()]
    ok = (ddp.get("status") == "ok" and fsdp.get("status") == "ok" and one_each and set(one_each) == {1}
          and len([p for p in dm.get("peak_memory_bytes_per_rank") or [] if p]) == 2
          and len(set(dm.get("devices") or [])) == 2 and fm.get("world_size") == 2
          and len([p for p in fm.get("peak_memory_bytes_per_rank") or [] if p]) == 2)
    return [result(TWO_GPU, PASS if ok else FAIL, none_visible_devices=one_each,
                   ddp_peaks=dm.get("peak_memory_bytes_per_rank"),
                   fsdp_peaks=fm.get("peak_memory_bytes_per_rank"), devices=dm.get("devices"),
                   errors=[x.get("error") for x in (ddp, fsdp) if x.get("error")] or None,
                   tail=None if ok else tail + tail2)]


# ---------------------------------------------------------------- the page


def write_docs(folder: Path, results: list[dict], line: str, device: str, seconds: float) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    day = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")
    stem = f"{day}-{re.sub(r'[^A-Za-z0-9]+', '-', device).strip('-').lower()}"
    (folder / f"{stem}.json").write_text(json.dumps({"device": device, "date": day, "seconds": round(seconds, 1),
                                                     "summary": line, "checks": results}, indent=1, default=str))
    rows = "\n".join(f"| {r['check']} | {r['status']} | {json.dumps({k: v for k, v in r.items() if k not in ('check', 'status', 'tail')}, default=str)[:300]} |"
                     for r in results)
    (folder / f"{stem}.md").write_text(
        f"# GPU check, {device}, {day}\n\n`make gpu-check` (benchmarks/gpu_check.py), {seconds:.0f} s.\n\n"
        f"{line}\n\n| check | status | facts |\n|---|---|---|\n{rows}\n")
    return folder / f"{stem}.md"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="where the runs' records go (default: a temp folder)")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs" / "gpu", help="where the page goes")
    parser.add_argument("--wheels", type=Path, default=WHEELS_DIR, help="wheels to install missing packages from")
    parser.add_argument("--steps", type=int, default=6, help="training steps per run")
    parser.add_argument("--download-wheels", type=Path, metavar="DIR", default=None,
                        help="download the GPU machine's wheels into DIR and exit (make gpu-wheels)")
    parser.add_argument("--python", nargs="+", default=list(GPU_PYTHONS), help="Pythons to download wheels for")
    args = parser.parse_args(argv)
    if args.steps < 3:
        parser.error("--steps must be at least 3 (the breakdown probe and timed steps)")
    if args.download_wheels is not None:
        return download_wheels(args.download_wheels, tuple(args.python))

    t0 = time.perf_counter()
    import torch

    if not torch.cuda.is_available():
        results = not_run(CHECKS, "no CUDA device")
        line, code = summary(results)
        print(line, flush=True)
        return code
    why = ensure_imports(args.wheels)
    if why:
        results = not_run(CHECKS, why)
        line, code = summary(results)
        print(line, flush=True)
        return code
    out_dir = args.out or Path(tempfile.mkdtemp(prefix="gpu-check-"))
    device, n_gpu = torch.cuda.get_device_name(0), torch.cuda.device_count()
    results: list[dict] = []
    try:
        in_process_checks(results)
    except Exception as exc:  # the check that raised failed; the ones after it could not run; the runs still do
        done = len(results)
        results += [result(CHECKS[done], FAIL, error=repr(exc))] + not_run(CHECKS[done + 1:3], f"{CHECKS[done]} raised")
    sweep_results, sweep = sweep_checks(out_dir, args.steps)
    results += sweep_results
    results += fsdp_check(out_dir, args.steps, sweep)
    results += two_gpu_check(out_dir, args.steps, sweep) if n_gpu >= 2 else not_run([TWO_GPU], f"{n_gpu} GPU visible; needs 2")
    line, code = summary(results)
    print(line, flush=True)
    page = write_docs(args.docs, results, line, device, time.perf_counter() - t0)
    print(f"gpu-check: {page} and its .json; records under {out_dir}", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
