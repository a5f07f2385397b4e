"""Planning: a resolved config becomes a job (its hashes and run ids), and every job of a command
is checked before the first one runs.

``plan`` checks one composed config against the typed schema (``config.validate``), normalizes
it (method fields that do not apply, hardware=auto resolved to the detected device's preset) and
names it (``identity``). ``check_inputs`` looks at what the config points to: the model, the data
files, the MMLU source, the adapter's target modules.

``preflight`` runs before Hydra starts: Hydra launches a sweep's jobs one after another, so an
input error in the third job would surface after two jobs had run and written their records.
The command line is expanded the way Hydra's basic sweeper expands it (command-line sweeps plus a
preset's ``hydra.sweeper.params``), each job's config is composed through Hydra's own config
loader, and each is planned and checked. The first bad input ends the command: one line, exit
code 2, nothing written.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import sys
from pathlib import Path

from harness import identity, records
from harness.config import CONF_DIR, GROUPS, UsageError, group_options, usage_exit, validate

# MMLU from the hub (eval.mmlu.dir unset): lm-eval's mmlu task reads this dataset
MMLU_HUB_DATASET = "cais/mmlu"
HUB_HOST = ("huggingface.co", 443)
OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


def plan(cfg: dict) -> dict:
    """Resolved config -> job: normalized config, hashes, run ids. Raises UsageError on bad input."""
    from harness import distributed
    from harness.data import DataError, check_fit
    from harness.measure.pricing import PriceTableError, load_price_table, resolve_hardware, unpriced_hardware
    from harness.methods import MethodError, normalize, rank_of
    from harness.methods import validate as validate_method
    from harness.schedule import ScheduleError, check_schedule

    cfg = {k: v for k, v in cfg.items() if k != "hydra"}
    validate(cfg, schema_of(cfg))
    cfg["method"] = normalize(cfg["method"])
    try:
        validate_method(cfg["method"])
        distributed.validate(cfg["distributed"])
        check_fit(cfg["data"], cfg["train"]["seq_len"])
        check_schedule(cfg["train"])
        # hardware=auto becomes the detected entry, so runs on other hardware are other runs
        table = load_price_table(CONF_DIR)
        entry = resolve_hardware(cfg["hardware"], table)
    except (MethodError, PriceTableError, distributed.DistributedError, DataError, ScheduleError) as exc:
        raise UsageError(str(exc)) from exc
    from harness.estimate import check_target
    from harness.measure.variants import check_settings as check_variants
    from harness.tuning import check_job as check_tuning

    if problem := check_variants(cfg["eval"]["variants"]) or check_tuning(cfg):
        raise UsageError(problem)

    if problem := check_target(cfg["verdict"]["target_model"], cfg["verdict"]["target_hardware"],
                               ("verdict.target_model=", "verdict.target_hardware=")):
        raise UsageError(problem.replace("= '", "='"))
    cfg["hardware"] = entry or unpriced_hardware(table)  # an unknown device: no neighbour's price, a warning
    method = cfg["method"]["name"]
    rank = rank_of(cfg["method"])
    return {
        "config": cfg,
        "config_hash": identity.config_hash(cfg),
        "pair_key": identity.pair_key(cfg),
        "eval_key": identity.base_key(cfg),
        "method": method,
        "rank": rank,
        "run_id": identity.run_id(method, rank, cfg),
        "base_run_id": records.run_id_for("base", None, identity.base_key(cfg)),
    }


def schema_of(cfg: dict) -> type:
    """harness-estimate's schema for its config (it has the estimator's keys), else harness-run's."""
    from harness.config import EstimateConfig, RunConfig

    return EstimateConfig if "estimate" in cfg else RunConfig


def check_inputs(cfg: dict) -> None:
    """Fail fast, before any record is written, on inputs that cannot work: paths that do not
    exist, MMLU from the hub on a machine that cannot reach it, target modules the model lacks."""
    from harness.data import DataError, load_data
    from harness.evaluate import EvalDataError, mmlu_tasks, task_manager_for
    from harness.methods import MethodError, check_targets
    from harness.models import ModelSourceError, arch_path, model_folder, resolve_gguf
    from harness.tracking import check as check_tracker

    check_tracker(cfg)  # tracking=<backend> needs its package (docs/trackers.md)
    try:
        model = cfg["model"]
        if model["source"] == "gguf":
            resolve_gguf(model.get("gguf") or {})
        elif model["source"] == "config":
            arch_path(str(model["arch"]))
        elif model["source"] == "hub":
            model_folder(model)
        if cfg["data"]["kind"] != "hub" or Path(str(cfg["data"]["dataset"])).expanduser().exists():
            check_rendering(cfg, load_data(cfg["data"]))  # every row checked: a bad one is one line
        elif not _hub_cached(str(cfg["data"]["dataset"])) and (reason := hub_offline()):
            raise DataError(f"data.dataset={cfg['data']['dataset']!r} is not a local file or folder and the hub "
                            f"cannot be reached ({reason}); give a local file or a save_to_disk folder")
        forgetting = cfg["eval"].get("forgetting") or {}
        if forgetting.get("enabled") and forgetting.get("path") and not Path(str(forgetting["path"])).expanduser().is_file():
            raise DataError(f"eval.forgetting.path={forgetting['path']!r} does not exist; give a text file "
                            "(or null for the bundled sample)")
        if cfg["eval"].get("tasks") or cfg["eval"].get("include_path"):
            task_manager_for(cfg["eval"])  # every task name known, before any job
        mmlu = cfg["eval"]["mmlu"]
        if mmlu["enabled"] and mmlu.get("dir"):
            mmlu_tasks(mmlu)
        elif mmlu["enabled"] and (cfg["model"]["source"] != "config" or cfg["eval"].get("on_random_weights")):
            check_mmlu_reachable()
        check_targets(cfg["method"], model)
    except (ModelSourceError, DataError, EvalDataError, MethodError) as exc:
        raise UsageError(str(exc)) from exc


def check_rendering(cfg: dict, data) -> None:
    """Render and tokenize every non-multiple-choice example as the job will (its chat template,
    loss_on, seq_len), so that a template that cannot render a row stops the sweep here."""
    from harness.data import tokenize_examples
    from harness.models import local_tokenizer

    examples = [ex for ex in data.train + data.heldout_text if ex["style"] != "mc"]
    if not examples or (tokenizer := local_tokenizer(cfg["model"])) is None:
        return
    tokenize_examples(data.train, tokenizer, cfg["train"]["seq_len"], cfg["data"])
    if data.heldout_text:
        tokenize_examples(data.heldout_text, tokenizer, cfg["train"]["seq_len"], cfg["data"])


def hub_offline() -> str | None:
    """Why the hub cannot be reached (an offline variable, no connection), or None."""
    import socket

    for var in OFFLINE_VARS:
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{var}={os.environ[var]}"
    try:
        socket.create_connection(HUB_HOST, timeout=3).close()
    except OSError as exc:
        return f"{HUB_HOST[0]} cannot be reached ({type(exc).__name__})"
    return None


def _hub_cached(dataset: str) -> bool:
    """Whether ``datasets`` has ``dataset`` in its cache already (so an offline run can read it)."""
    home = Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface")
    folders = [Path(os.environ["HF_DATASETS_CACHE"])] if os.environ.get("HF_DATASETS_CACHE") else []
    folders += [home / "datasets", home / "hub"]
    owner, name = dataset.split("/")
    patterns = (f"{owner}___{name}", f"datasets--{owner}--{name}")
    return any((folder / p).is_dir() for folder in folders for p in patterns)


def check_mmlu_reachable() -> None:
    """MMLU from the hub needs the hub or a cached copy; refuse the run before it starts otherwise."""
    from harness.evaluate import EvalDataError

    why = hub_offline()
    if why and not _hub_cached(MMLU_HUB_DATASET):
        raise EvalDataError(f"MMLU comes from the hub ({MMLU_HUB_DATASET}) when eval.mmlu.dir is unset, and {why}; "
                            "give eval.mmlu.dir=<a folder in MMLU's release layout> or eval.mmlu.enabled=false")


# ---------------------------------------------------------------- preflight: every job of a command


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
            options = group_options(key, dirs)
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


def preflight(argv: list[str], conf_dir: Path = CONF_DIR) -> list[dict]:
    """Exit 2 with one line on the first bad input of any job of this command; else the planned
    jobs (none for Hydra's own commands: --help, --cfg, ...)."""
    # log lines of the libraries planning imports (bitsandbytes warns on import) go to stdout,
    # as they do under Hydra's logging once the jobs run: stderr keeps the one error line
    handler = logging.StreamHandler(sys.stdout)
    logging.getLogger().addHandler(handler)
    try:
        return _check(argv, conf_dir)
    finally:
        logging.getLogger().removeHandler(handler)


def _check(argv: list[str], conf_dir: Path) -> list[dict]:
    from omegaconf import OmegaConf

    check_names(argv, conf_dir, usage_exit)
    args = _args(argv)
    if args is None or args.help or args.hydra_help or args.cfg or args.info or args.shell_completion:
        return []  # Hydra's own commands: nothing runs
    try:
        configs = job_configs(argv, conf_dir)
    except Exception as exc:  # a composition error (unknown key, bad override): Hydra's message, one line
        usage_exit(_one_line(exc))
    checked: set[str] = set()
    jobs = []
    for cfg in configs:
        job_cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
        missing = _missing(OmegaConf.to_container(job_cfg, resolve=False))
        if missing:
            group = missing[0].split(".")[0]
            choice = OmegaConf.select(cfg, f"hydra.runtime.choices.{group}", default=None)
            usage_exit(f"{missing[0]} is required{f' with {group}={choice}' if choice else ''}; "
                       f"give it on the command line: {missing[0]}=...")
        try:
            resolved = OmegaConf.to_container(job_cfg, resolve=True)
        except Exception as exc:  # an interpolation that cannot resolve (tune.point outside the grid)
            usage_exit(_one_line(exc))
        try:
            job = plan(resolved)
            inputs = json.dumps([job["config"][k] for k in ("model", "data", "eval")]
                                + [job["config"]["method"].get("target_modules")], sort_keys=True, default=str)
            if inputs not in checked:  # a sweep over methods or seeds reads each data file once
                check_inputs(job["config"])
                checked.add(inputs)
        except UsageError as exc:
            usage_exit(str(exc))
        jobs.append(job)
    from harness.tuning import check_sweep

    if problem := check_sweep(jobs):
        usage_exit(problem)
    return jobs
