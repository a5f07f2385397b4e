"""The Hydra callback that rebuilds the report when a harness-run run or sweep ends (report=true).

Imports the report's stack (pandas, matplotlib) only when it builds, not when Hydra starts."""

from __future__ import annotations

import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


class ReportCallback(Callback):
    """Rebuild the report when a run or a sweep ends (report=true)."""

    def _report(self, config: DictConfig) -> None:
        if not config.get("report", True):
            return
        from omegaconf import OmegaConf

        from harness.report import build_report
        from harness.report.verdict import Limits

        try:
            limits = Limits(**OmegaConf.to_container(config.verdict)) if config.get("verdict") else None
            written = build_report(config.results_dir, config.reports_dir, limits=limits)
        except Exception as exc:  # the runs are safe in results/; a report problem must not hide that
            print(f"harness-run: report not rebuilt: {exc}", file=sys.stderr)
            return
        print(f"At-a-glance table: {written.get('at-a-glance.md') or Path(config.reports_dir) / 'at-a-glance.md'}",
              flush=True)
        verdict = written.get("verdict.json")
        if verdict:  # one line per table: the answer a sweep was run for (harness-report --max-gap … to judge yours)
            import json

            for table in json.loads(Path(verdict).read_text())["tables"]:
                print(f"Verdict, {table['title']}: {table['recommendation']}", flush=True)

    def on_run_end(self, config: DictConfig, **kwargs) -> None:
        self._report(config)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        self._report(config)
