"""Check every job of a harness-run command before the first one runs.

Hydra launches a sweep's jobs one after another, so an input error in the third job would
surface after two jobs had run and written their records. Here, before Hydra starts, the
command line is expanded the way Hydra's basic sweeper expands it (command-line sweeps plus a
preset's ``hydra.sweeper.params``), each job's config is composed through Hydra's own config
loader, and each is planned and checked (``run.plan``, ``run.check_inputs``). The first bad
input ends the command: one line, exit code 2, nothing written.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import sys
from pathlib import Path

from harness.run import GROUPS


def _args(argv: list[str]):
    from hydra._internal.utils import get_args_parser

    try:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            return get_args_parser().parse_args(argv)
    except SystemExit:  # --version or a bad flag: Hydra prints its answer once, as it always does
        return None


def config_dirs(conf_dir: Path, argv: list[str]) -> list[Path]:
    """The packaged config folder, then the user's own (--config-dir, hydra.searchpath)."""
    dirs = [conf_dir]
    args = _args(argv)
    if args is not None and args.config_dir:
        dirs.append(Path(args.config_dir).expanduser().resolve())
    for arg in argv:
        if arg.startswith("hydra.searchpath="):
            for entry in arg.partition("=")[2].strip("[]").split(","):
                entry = entry.strip().strip("'\"")
                if entry.startswith("file://"):
                    dirs.append(Path(entry.removeprefix("file://")).expanduser().resolve())
    return dirs


def check_names(argv: list[str], conf_dir: Path, fail) -> None:
    """Names of config-group options and r values, checked before Hydra prints a stack of text."""
    dirs = config_dirs(conf_dir, argv)
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, _, value = arg.partition("=")
        key = key.lstrip("+~")
        values = [v.strip() for v in value.split(",")]
        if key in GROUPS:
            options = sorted({p.stem for d in dirs for p in (d / key).glob("*.yaml")})
            bad = [v for v in values if v and v not in options and v != "null"]
            if bad:
                fail(f"{key}={bad[0]!r} is unknown; valid: {', '.join(options)}")
        if key == "method.r":
            for v in values:
                if v != "null" and (not v.lstrip("-").isdigit() or int(v) <= 0):
                    fail(f"method.r={v!r} is invalid; give a positive integer (for example 8, 16, 64)")


def _one_line(exc: Exception) -> str:
    lines = [line.strip().rstrip(".") for line in str(exc).splitlines() if line.strip()]
    return "; ".join(lines) or type(exc).__name__


def _missing(tree, prefix: str = "") -> list[str]:
    """Keys still at ``???`` (without resolving interpolations that point at them)."""
    if isinstance(tree, dict):
        return [k for key, value in tree.items() for k in _missing(value, f"{prefix}{key}.")]
    return [prefix.rstrip(".")] if tree == "???" else []


def job_configs(argv: list[str], conf_dir: Path) -> list:
    """The composed config (DictConfig, hydra node included) of every job the command would run."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra._internal.utils import create_config_search_path
    from hydra.core.config_search_path import SearchPathQuery
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.types import RunMode

    args = _args(argv)
    search_path = create_config_search_path(f"file://{conf_dir}")
    if args.config_dir:  # as Hydra adds it: after the main folder, before structured configs
        search_path.prepend(provider="command-line", path=f"file://{Path(args.config_dir).resolve()}",
                            anchor=SearchPathQuery(provider="schema"))
    loader = ConfigLoaderImpl(config_search_path=search_path)
    name = args.config_name or "config"
    overrides = list(args.overrides)
    first = loader.load_configuration(name, overrides, run_mode=RunMode.MULTIRUN, validate_sweep_overrides=False)
    multirun = args.multirun or first.hydra.mode == RunMode.MULTIRUN
    if not multirun:
        return [loader.load_configuration(name, overrides, run_mode=RunMode.RUN)]
    params = [f"{k}={v}" for k, v in (first.hydra.sweeper.get("params") or {}).items()]
    parsed = OverridesParser.create(config_loader=loader).parse_overrides(params + overrides)
    (jobs,) = BasicSweeper.split_arguments(parsed, max_batch_size=None)
    return [loader.load_configuration(name, job, run_mode=RunMode.MULTIRUN) for job in jobs]


def check(argv: list[str], conf_dir: Path) -> None:
    """Exit 2 with one line on the first bad input of any job of this command; else return."""
    # log lines of the libraries planning imports (bitsandbytes warns on import) go to stdout,
    # as they do under Hydra's logging once the jobs run: stderr keeps the one error line
    handler = logging.StreamHandler(sys.stdout)
    logging.getLogger().addHandler(handler)
    try:
        _check(argv, conf_dir)
    finally:
        logging.getLogger().removeHandler(handler)


def _check(argv: list[str], conf_dir: Path) -> None:
    from omegaconf import OmegaConf

    from harness.run import UsageError, check_inputs, plan, usage_exit

    check_names(argv, conf_dir, usage_exit)
    args = _args(argv)
    if args is None or args.help or args.hydra_help or args.cfg or args.info or args.shell_completion:
        return  # Hydra's own commands: nothing runs
    try:
        configs = job_configs(argv, conf_dir)
    except Exception as exc:  # a composition error (unknown key, bad override): Hydra's message, one line
        usage_exit(_one_line(exc))
    checked: set[str] = set()
    for cfg in configs:
        job_cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
        missing = _missing(OmegaConf.to_container(job_cfg, resolve=False))
        if missing:
            group = missing[0].split(".")[0]
            choice = OmegaConf.select(cfg, f"hydra.runtime.choices.{group}", default=None)
            usage_exit(f"{missing[0]} is required{f' with {group}={choice}' if choice else ''}; "
                       f"give it on the command line: {missing[0]}=...")
        resolved = OmegaConf.to_container(job_cfg, resolve=True)
        try:
            job = plan(resolved)
            inputs = json.dumps([job["config"][k] for k in ("model", "data", "eval")], sort_keys=True, default=str)
            if inputs not in checked:  # a sweep over methods or seeds reads each data file once
                check_inputs(job["config"])
                checked.add(inputs)
        except UsageError as exc:
            usage_exit(str(exc))
