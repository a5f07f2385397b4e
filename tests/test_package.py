"""`pip install .` (not editable) gives working console scripts from any folder, configs inside.

Slow: builds the wheel from a copy of the checkout (so the build leaves nothing in it) and
installs it with --no-deps into a fresh virtual environment that sees this environment's
packages (torch, transformers, ...) through a .pth file, not this checkout.
"""

import os
import subprocess
import sys
import sysconfig
import zipfile

import pytest
from conftest import ROOT, TINY

pytestmark = pytest.mark.slow

USER_MODEL = "name: my-tiny\nsource: config\npath: null\narch: tiny-random\ngguf: null\n"


def sh(*cmd, cwd, env=None, timeout=600):
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (cmd, proc.stdout[-3000:], proc.stderr[-3000:])
    return proc


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("package")
    # without the session's PYTHONPATH (this checkout): pip would take the checkout's
    # peft_harness.egg-info (from `pip install -e .`) for an installed copy and install nothing
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    files = sh("git", "ls-files", "-co", "--exclude-standard", cwd=ROOT).stdout.splitlines()
    src = tmp / "src"
    for name in files:
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            (src / name).write_bytes((ROOT / name).read_bytes())
    sh(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", tmp / "dist",
       src, cwd=tmp, env=env)
    (wheel,) = (tmp / "dist").glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {f"harness/{n}" for n in sh("git", "ls-files", "conf", cwd=ROOT).stdout.split()} <= set(names)
    assert "harness/report/templates/report.html.j2" in names  # the report page's template ships
    env_dir = tmp / "venv"
    sh(sys.executable, "-m", "venv", "--without-pip", env_dir, cwd=tmp)
    python = env_dir / "bin" / "python"
    purelib = sh(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp).stdout.strip()
    # the dependencies: this environment's site-packages, after the venv's own
    with open(os.path.join(purelib, "deps.pth"), "w") as fh:
        fh.write(sysconfig.get_paths()["purelib"] + "\n")
    sh(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", wheel, cwd=tmp, env=env)
    elsewhere = tmp / "elsewhere"
    elsewhere.mkdir()
    return env_dir / "bin", env, elsewhere


def test_installed_package_reads_its_packaged_configs(venv):
    bin_dir, env, elsewhere = venv
    out = sh(bin_dir / "python", "-c", "import harness.run as r; print(r.__file__); print(r.CONF_DIR)",
             cwd=elsewhere, env=env).stdout.split()
    assert all(str(bin_dir.parent) in line for line in out), out
    assert out[1].endswith("harness/conf")
    help_text = sh(bin_dir / "harness-run", "--help", cwd=elsewhere, env=env).stdout
    assert "tiny-random" in help_text and "qlora" in help_text  # config groups listed from the package
    for script in ("harness-report", "harness-check"):
        sh(bin_dir / script, "--help", cwd=elsewhere, env=env)


def test_installed_harness_run_runs_a_job_from_another_folder_with_a_user_config_folder(venv):
    bin_dir, env, elsewhere = venv
    (elsewhere / "my-conf" / "model").mkdir(parents=True)
    (elsewhere / "my-conf" / "model" / "my-tiny.yaml").write_text(USER_MODEL)
    tiny = [a for a in TINY if not a.startswith(("model=", "report="))]
    proc = sh(bin_dir / "harness-run", "--config-dir", "my-conf", "model=my-tiny", *tiny, "isolate=true",
              cwd=elsewhere, env=env)
    records = list((elsewhere / "results").glob("lora-*.json"))
    assert len(records) == 1, proc.stdout[-2000:]
    assert (elsewhere / "reports" / "at-a-glance.md").is_file()
    sh(bin_dir / "harness-report", "--results", "results", "--reports", "rebuilt", cwd=elsewhere, env=env)
    assert (elsewhere / "rebuilt" / "at-a-glance.md").is_file()
