"""Device identity: what a run ran on (the record's ``env``), and the device a price preset matches.

``environment`` is the record's ``env`` (package versions, commit, device and its count, host,
how the job was launched); ``device_identity`` names device 0 and its memory, and
``detect_hardware`` picks the price preset (conf/hardware/*.yaml) whose ``match`` fits it. Nothing
here imports torch at module import: a job calls these where it looks at a device anyway.
"""

from __future__ import annotations

import datetime as dt
import platform
import subprocess
from pathlib import Path

from harness.config import CONF_DIR

GIB = 1024**3
PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "lm_eval", "datasets", "hydra-core")


def environment() -> dict:
    import importlib.metadata as md

    import torch

    from harness.sweep import launch_env

    versions = {}
    for pkg in PACKAGES:
        try:
            versions[pkg.replace("-", "_")] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg.replace("-", "_")] = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=CONF_DIR.parent,
                                timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    cuda = torch.cuda.is_available()
    return {
        "versions": versions,
        "git_commit": commit,
        "python": platform.python_version(),
        "device": "cuda" if cuda else "cpu",
        "device_name": torch.cuda.get_device_name(0) if cuda else cpu_name(),
        "device_count": torch.cuda.device_count() if cuda else 1,
        "cpu_threads": torch.get_num_threads(),
        "host": platform.node(),
        **launch_env(),
    }


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def gpu_has_native_bf16() -> bool:
    """Whether CUDA device 0 runs bf16 natively (compute capability 8.0 or later, or ROCm). The
    one place the harness asks: ``torch.cuda.is_bf16_supported()`` counts emulation by default, so
    a V100 or T4 would get a bf16 base, bf16 autocast and bf16 QLoRA compute, emulated and many
    times slower; ``including_emulation=False`` does not. False without CUDA."""
    import torch

    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False))


def device_identity() -> tuple[str, int | None]:
    """(name, total memory in bytes) of device 0: ``torch.cuda.get_device_name(0)`` and
    ``get_device_properties(0).total_memory``, or ("cpu", None) without CUDA. Imports torch (the
    module does not): call it where a device is looked at anyway."""
    import torch

    if not torch.cuda.is_available():
        return "cpu", None
    return torch.cuda.get_device_name(0), int(torch.cuda.get_device_properties(0).total_memory)


def device_name() -> str:
    """``torch.cuda.get_device_name(0)``, or "cpu" without CUDA (imports torch: call in the job)."""
    return device_identity()[0]


def fits(entry: dict, name: str, memory_bytes: int | None) -> int:
    """Length of the longest ``match`` substring of ``entry`` in ``name`` (0: the entry does not
    apply): no ``exclude`` substring may be in the name, and the device memory must lie in
    ``memory_gib`` where the entry gives a range (an unknown memory does not fit a range)."""
    low = name.lower()
    if any(x.lower() in low for x in entry["exclude"]):
        return 0
    memory = entry.get("memory_gib")
    if memory is not None and (memory_bytes is None or not memory[0] <= memory_bytes / GIB <= memory[1]):
        return 0
    return max((len(m) for m in entry["match"] if m.lower() in low), default=0)


def detect_hardware(table: dict[str, dict], name: str | None = None, memory_bytes: int | None = None) -> dict | None:
    """The entry that fits the device (see ``fits``; the longest ``match`` wins), or None.

    ``name`` and ``memory_bytes`` default to ``device_identity()``. None for an unknown device or
    when two entries fit equally well: an unpriced run, never a neighbour's price.
    """
    if name is None:
        name, memory_bytes = device_identity()
    scores = sorted(((fits(e, name, memory_bytes), e["name"]) for e in table.values()), reverse=True)
    if not scores or scores[0][0] == 0 or (len(scores) > 1 and scores[1][0] == scores[0][0]):
        return None
    return table[scores[0][1]]
