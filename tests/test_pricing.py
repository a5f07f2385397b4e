"""Pricing: the price table, matching a device (name and memory) to a preset, dollar cost of the
devices or CPU cores a run used. Devices are faked by name and memory: no GPU needed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from harness.measure import environment, pricing
from harness.measure.environment import detect_hardware
from harness.measure.pricing import (
    PriceTableError,
    cost_metrics,
    cost_usd,
    cpu_cores_used,
    load_price_table,
    projected_cost,
    resolve_hardware,
    unpriced_hardware,
)

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
GIB = 1024**3


@pytest.fixture(scope="module")
def table() -> dict:
    return load_price_table(CONF)


def test_pricing_imports_no_torch():
    code = "import sys, harness.measure.pricing; sys.exit(1 if 'torch' in sys.modules else 0)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, "importing harness.measure.pricing imported torch" + proc.stderr


def test_cost_arithmetic():
    assert cost_usd(3600, 2.0, 1) == 2.0
    assert cost_usd(1800, 4.0, 8) == pytest.approx(16.0)
    p = projected_cost(tokens=1_000_000, epochs=3, tokens_per_s=1000.0, price=2.0, device_count=2)
    assert p["projected_tokens"] == 3_000_000
    assert p["projected_wall_h"] == pytest.approx(3000 / 3600)
    assert p["projected_cost_usd"] == pytest.approx(3000 / 3600 * 2.0 * 2)
    entry = {"name": "x", "price_per_device_hour_usd": 3.0, "price_source": "s", "price_date": "d"}
    c = cost_metrics(entry, 7200, device_count=1, dataset_tokens=3600, epochs=1, tokens_per_s=1.0, run_seconds=3600)
    assert c["cost_usd"] == 6.0 and c["run_cost_usd"] == 3.0 and c["projected_cost_usd"] == pytest.approx(3.0)
    assert (c["priced_unit"], c["priced_units"], c["price_per_core_hour_usd"]) == ("device", 1, None)
    assert cost_metrics(None, 7200)["cost_usd"] is None


def test_gpu_price_is_for_the_devices_used_not_visible(table):
    # 2 processes on a machine that shows 8 GPUs: 2 device-hours per hour
    c = cost_metrics(table["h200"], 3600, device_count=2, cpu_cores=64)
    assert c["priced_units"] == 2 and c["cost_usd"] == pytest.approx(2 * 4.59)


def test_cpu_run_is_priced_per_core_it_used(table):
    entry = table["cpu"]
    assert entry["price_per_core_hour_usd"] == pytest.approx(0.4032 / 8)  # m7i.2xlarge per vCPU
    assert "per vCPU" in entry["price_source"]
    one = cost_metrics(entry, 3600, cpu_cores=cpu_cores_used(1, 1, available=16))
    four = cost_metrics(entry, 3600, cpu_cores=cpu_cores_used(2, 2, available=16))
    assert (one["priced_unit"], one["priced_units"]) == ("cpu core", 1)
    assert one["cost_usd"] == pytest.approx(0.0504)  # not the 8-vCPU instance's 0.4032
    assert four["priced_units"] == 4 and four["cost_usd"] == pytest.approx(4 * 0.0504)
    assert one["price_per_device_hour_usd"] is None and one["price_per_core_hour_usd"] == pytest.approx(0.0504)
    # threads beyond the cores the job may run on are not cores used
    assert cpu_cores_used(8, 2, available=2) == 2
    with pytest.raises(ValueError, match="cpu_cores"):
        cost_metrics(entry, 3600)


@pytest.mark.parametrize(
    "name, memory_gib, expected",
    [
        ("NVIDIA A100-SXM4-80GB", 79.2, "a100-80gb"),
        ("NVIDIA A100-SXM4-40GB", 39.4, None),  # not the 80GB price
        ("NVIDIA A100-PCIE-40GB", 39.4, None),
        ("NVIDIA A100 80GB PCIe", 79.2, None),  # the preset's price is the SXM card's
        ("NVIDIA H100 80GB HBM3", 79.1, "h100-80gb"),
        ("NVIDIA H100 PCIe", 79.1, None),  # same memory as SXM, another product
        ("NVIDIA H100 NVL", 93.1, None),
        ("NVIDIA H200", 139.8, "h200"),
        ("NVIDIA H200 NVL", 139.8, None),
        ("NVIDIA GH200 144G HBM3e", 139.8, None),  # Grace Hopper, not an H200 SXM
        ("NVIDIA GH200 480GB", 94.5, None),
        ("NVIDIA L40S", 44.4, "l40s"),
        ("NVIDIA L40", 44.4, None),
        ("NVIDIA GeForce RTX 4090", 23.6, "rtx-4090"),
        ("NVIDIA GeForce RTX 4090 Laptop GPU", 15.6, None),
        ("NVIDIA GeForce RTX 4090 D", 23.6, None),
        ("NVIDIA Tesla T4", 14.6, None),
        ("cpu", None, "cpu"),
    ],
)
def test_device_name_and_memory_pick_the_preset(table, name, memory_gib, expected):
    entry = detect_hardware(table, name, int(memory_gib * GIB) if memory_gib else None)
    assert (entry["name"] if entry else None) == expected


def test_a_gpu_preset_with_a_memory_range_needs_the_memory(table):
    assert detect_hardware(table, "NVIDIA A100-SXM4-80GB", None) is None


def test_two_presets_that_fit_equally_leave_the_device_unpriced(table):
    twin = {**table["h200"], "name": "h200-twin"}
    assert detect_hardware({**table, "h200-twin": twin}, "NVIDIA H200", int(139.8 * GIB)) is None


def test_unknown_device_is_unpriced_with_a_warning_printed_and_recorded(table, monkeypatch, capsys):
    monkeypatch.setattr(environment, "device_identity", lambda: ("NVIDIA A100-SXM4-40GB", int(39.4 * GIB)))
    assert resolve_hardware({"name": "auto"}, table) is None
    hardware = unpriced_hardware(table)
    err = capsys.readouterr().err
    assert "warning" in err and "NVIDIA A100-SXM4-40GB" in err and "a100-80gb is for 70-90 GiB" in err
    assert hardware["name"] == "unpriced (NVIDIA A100-SXM4-40GB)"
    c = cost_metrics(hardware, 3600, run_seconds=4000, dataset_tokens=10**6, tokens_per_s=100.0)
    assert c["cost_usd"] is c["run_cost_usd"] is c["projected_cost_usd"] is c["hardware"] is None
    assert c["price_warning"] == hardware["price_warning"] and "39.4 GiB" in c["price_warning"]


def test_excluded_variant_says_why(table):
    text = pricing.unpriced_warning(table, "NVIDIA H100 PCIe", int(79.1 * GIB))
    assert "h100-80gb excludes PCIe" in text and "conf/hardware/<name>.yaml" in text


def test_price_table_in_conf_is_valid(table):
    assert {"a100-80gb", "h100-80gb", "h200", "l40s", "rtx-4090", "cpu"} <= set(table)
    assert "auto" not in table
    for name, entry in table.items():
        assert (CONF / "hardware" / f"{name}.yaml").exists()
        assert pricing.price_of(entry)[0] > 0 and entry["price_source"] and entry["price_date"]
        if name != "cpu":  # every GPU preset: a datasheet peak with its source, and a memory range
            assert entry["datasheet_bf16_dense_tflops"] > 0 and entry["datasheet_source"]
            assert entry["memory_gib"][0] < entry["memory_gib"][1]
    # a shell override of the price wins over the file
    assert (
        resolve_hardware({"name": "h200", "price_per_device_hour_usd": 9.5}, table)["price_per_device_hour_usd"] == 9.5
    )
    with pytest.raises(PriceTableError, match="'tpu-v9' is not in the price table"):
        resolve_hardware({"name": "tpu-v9"}, table)


def test_datasheet_peaks_agree_with_the_estimator(table):
    from harness import estimate

    for name, spec in estimate.DEVICES.items():
        assert table[name]["datasheet_bf16_dense_tflops"] * 1e12 == pytest.approx(spec["peak_flops"])


@pytest.mark.parametrize(
    "body, message",
    [
        ("name: x\nprice_source: s\nprice_date: '2026-01-01'\n", "price_per_device_hour_usd is missing"),
        ("name: x\nprice_per_device_hour_usd: 0\nprice_source: s\nprice_date: d\n", "is not a positive number"),
        ("name: x\nprice_per_device_hour_usd: -1.5\nprice_source: s\nprice_date: d\n", "is not a positive number"),
        ("name: x\nprice_per_device_hour_usd: cheap\nprice_source: s\nprice_date: d\n", "is not a positive number"),
        ("name: x\nprice_per_core_hour_usd: 0\nprice_source: s\nprice_date: d\n", "is not a positive number"),
        ("name: x\nprice_per_device_hour_usd: 1.0\nprice_date: d\n", "price_source is missing"),
        (
            "name: x\nprice_per_device_hour_usd: 1.0\nprice_per_core_hour_usd: 0.1\nprice_source: s\nprice_date: d\n",
            "both price_per_device_hour_usd and price_per_core_hour_usd are set",
        ),
        (
            "name: x\nprice_per_device_hour_usd: 1.0\nprice_source: s\nprice_date: d\nmemory_gib: [80]\n",
            "memory_gib [80] must be [min, max]",
        ),
        (
            "name: x\nprice_per_device_hour_usd: 1.0\nprice_source: s\nprice_date: d\ndatasheet_bf16_dense_tflops: 9\n",
            "needs a positive value and a datasheet_source",
        ),
    ],
)
def test_price_table_validation_names_the_file(tmp_path, body, message):
    (tmp_path / "hardware").mkdir()
    (tmp_path / "hardware" / "auto.yaml").write_text("name: auto\n")
    bad = tmp_path / "hardware" / "bad-gpu.yaml"
    bad.write_text(body)
    with pytest.raises(PriceTableError) as exc:
        load_price_table(tmp_path)
    text = str(exc.value)
    assert "bad-gpu.yaml" in text and message in text and "\n" not in text


@pytest.mark.parametrize("preset, device, memory_gib, mismatch", [
    ("h200", "NVIDIA H200", 139.8, False),
    ("h200", "NVIDIA GH200 144G HBM3e", 139.8, True),
    ("h200", "NVIDIA H100 80GB HBM3", 79.1, True),
    ("a100-80gb", "NVIDIA A100-SXM4-40GB", 39.4, True),  # the name fits, the memory does not
    ("cpu", "cpu", None, False),
    ("h200", "cpu", None, True),
])
def test_an_explicit_preset_is_checked_against_the_device(table, preset, device, memory_gib, mismatch):
    entry = resolve_hardware({"name": preset}, table)
    warning = pricing.hardware_mismatch(entry, device, int(memory_gib * GIB) if memory_gib else None)
    assert (warning is not None) is mismatch
    if mismatch:
        assert f"hardware={preset}" in warning and repr(device) in warning and "hardware=auto" in warning


def test_a_preset_without_a_match_list_or_a_price_is_not_checked(table):
    assert pricing.hardware_mismatch({"name": "mine", "price_per_device_hour_usd": 2.0, "match": []}, "cpu") is None
    assert pricing.hardware_mismatch({"name": "unpriced (X)", "price_per_device_hour_usd": None}, "X") is None


@pytest.mark.slow
def test_a_job_on_another_device_than_its_preset_warns_once_and_records_it(tmp_path):
    """A real job priced as hardware=h200 on this CPU: one warning line, metrics.hardware_warning."""
    from harness import records
    from tests.conftest import TINY, harness_run

    args = [a for a in TINY if not a.startswith("hardware=")]
    proc = harness_run(*args, "hardware=h200", "method=lora", f"results_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "does not match the device" in ln]
    assert len(lines) == 1, lines
    (rec,) = [r for r in records.load_records(tmp_path) if r["method"] == "lora"]
    assert rec["status"] == "ok" and "hardware=h200" in rec["metrics"]["hardware_warning"]
    assert rec["metrics"]["hardware"] == "h200"  # still priced as given
    ok = harness_run(*TINY, "method=lora", f"results_dir={tmp_path / 'cpu'}")
    (rec,) = [r for r in records.load_records(tmp_path / "cpu") if r["method"] == "lora"]
    assert ok.returncode == 0 and rec["metrics"]["hardware_warning"] is None
