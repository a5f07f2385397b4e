"""Packages of the wheel; everything else is in pyproject.toml.

The Hydra configs stay at the top level (conf/) and ship inside the package as ``harness.conf``
(harness/conf/ once installed), a mapping that pyproject.toml cannot declare beside automatic
package discovery. harness.config.CONF_DIR finds the packaged copy, or conf/ in a checkout.
Folders of data (conf/model/, harness/architectures/, ...) are listed as packages too, which is
how setuptools wants data folders declared.
"""

from pathlib import Path

from setuptools import find_namespace_packages, setup

HERE = Path(__file__).resolve().parent
conf_groups = sorted("harness.conf." + ".".join(p.relative_to(HERE / "conf").parts)
                     for p in (HERE / "conf").rglob("*") if p.is_dir() and "__pycache__" not in p.parts)

setup(
    packages=[*find_namespace_packages(include=["harness", "harness.*"], exclude=["*__pycache__*"]),
              "harness.conf", *conf_groups],
    package_dir={"harness.conf": "conf"},
    package_data={"": ["*.yaml", "*.json", "*.j2", "*.txt"]},  # *.j2: the report page template; *.txt: harness/texts
)
