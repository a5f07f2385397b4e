"""The configuration: the conf folder, its groups, the typed schema, composition, usage errors.

Every setting of ``harness-run`` and ``harness-estimate`` has a type here (``RunConfig``, one
dataclass per config group). ``validate`` checks a composed, resolved config against it before
any job is planned: a wrong type, an unknown key (``+train.max_step=2`` included), a value
outside its closed set or its range ends the command with one line and exit code 2
(``UsageError``). It never fills in or converts a value, so a config that passes hashes exactly as
it did before the schema existed (run ids, pairs and the committed baseline keep their identity).

The dataclasses declare; they are never instantiated. A field's annotation is its type
(``int``, ``float`` (an int is accepted), ``bool``, ``str``, ``Literal[...]`` for a closed set,
``X | None``, ``list[str]``, ``dict``, a nested group, ``Any``) and ``Annotated[T, Range(...)]``
gives a range. Keys of a group that only some of its options carry (``data.n_train`` for the
demo data) are optional: a config may leave them out. This module is below every other one:
it imports nothing of the harness.
"""

from __future__ import annotations

import difflib
import sys
import types
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin, get_type_hints

# The configs: packaged inside harness/ by `pip install .` (setup.py), conf/ in a checkout.
CONF_DIR = next(d for d in (Path(__file__).resolve().parent / "conf", Path(__file__).resolve().parent.parent / "conf")
                if (d / "config.yaml").is_file())
GROUPS = ("model", "method", "tune", "data", "train", "eval", "hardware", "distributed", "experiment", "tracking")
DOCS_URL = "docs/index.md"  # the docs, relative to the project folder (README.md links every page)


class UsageError(ValueError):
    """Bad input from the user: one line, exit code 2, nothing written."""


def usage_exit(message: str, prog: str = "harness-run") -> None:
    print(f"{prog}: error: {message}", file=sys.stderr)
    sys.exit(2)


# ---------------------------------------------------------------- closed sets

PRECISIONS = ("auto", "fp32", "bf16")  # train.precision: auto is bf16 autocast on a GPU that has it
# the Trainer's optimizers that the estimator has a memory model for (harness.estimate.OPTIMIZERS)
OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adamw_torch_4bit", "adamw_8bit", "adamw_bnb_8bit",
              "paged_adamw_8bit", "paged_adamw_32bit", "sgd")
# transformers.SchedulerType's values (tests/test_schema.py checks they agree)
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr", "cosine_warmup_with_min_lr",
              "warmup_stable_decay", "greedy")
MODEL_DTYPES = ("auto", "fp32", "bf16", "fp16", "float32", "bfloat16", "float16")
COMPUTE_DTYPES = ("auto", "float32", "bfloat16", "float16")
STRATEGIES = ("none", "ddp", "fsdp", "zero3")
TRACKERS = ("none", "mlflow", "wandb", "tensorboard", "trackio")  # tracking.backend (harness.tracking)
LOSS_ON = ("assistant", "last", "all")  # data.loss_on: which tokens carry the loss (harness.data.render)
OVERLONG = ("truncate", "drop")  # data.overlong: what becomes of an example longer than train.seq_len
# The latency probe's repetitions alternate the variants' order (ABBA): two repetitions make one
# cycle, and the paired t interval needs a few degrees of freedom to mean anything (at 2
# repetitions t = 12.7 and the interval read [-100%, +9e9%]).
MIN_LATENCY_REPS = 4
# a median's distribution-free 95% interval needs 6 values (harness.stats.median_interval)
MIN_MEDIAN_REPS = 6
# serving N variants keeps N adapters resident in one model (harness.measure.variants)
MAX_VARIANTS = 256


@dataclass(frozen=True)
class Range:
    """``ge`` / ``gt`` / ``le`` / ``lt`` bounds of a number."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def text(self) -> str:
        parts = [f"{op} {v:g}" for op, v in ((">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt))
                 if v is not None]
        return " and ".join(parts)

    def holds(self, x: float) -> bool:
        return ((self.ge is None or x >= self.ge) and (self.gt is None or x > self.gt)
                and (self.le is None or x <= self.le) and (self.lt is None or x < self.lt))


Positive = Annotated[int, Range(ge=1)]
Count = Annotated[int, Range(ge=0)]
Rate = Annotated[float, Range(gt=0)]


# ---------------------------------------------------------------- the schema, one dataclass per group


@dataclass
class GGUFConfig:
    package: str | None
    file: str | None
    path: str | None


@dataclass
class ModelConfig:
    name: str
    source: Literal["hub", "gguf", "config"]
    path: str | None          # hub id or local folder (source hub)
    arch: str | None          # harness/architectures/<arch>.json (source config)
    gguf: GGUFConfig | None   # source gguf
    dtype: Literal[MODEL_DTYPES]  # type: ignore[valid-type]
    revision: str | None


@dataclass
class MethodConfig:
    name: str
    learning_rate: Rate
    lr_grid: list[Rate]  # tune=lr: the rates tried (harness.tuning)
    peft_type: str | None
    r: Positive | None
    alpha: Annotated[float, Range(gt=0)] | None
    dropout: Annotated[float, Range(ge=0, lt=1)] | None
    target_modules: str | list[str] | None  # "all-linear", a regex, or module names
    use_dora: bool | None
    use_rslora: bool | None
    quantize: Literal["nf4"] | None
    compute_dtype: Literal[COMPUTE_DTYPES] | None  # type: ignore[valid-type]
    peft_kwargs: dict | None


@dataclass
class TuneConfig:
    """conf/tune/*.yaml: none, or lr (each method over its method.lr_grid; harness.tuning)."""

    name: Literal["none", "lr"]
    point: Count | None  # tune=lr: the position in method.lr_grid this job runs


@dataclass
class DataConfig:
    name: str
    kind: Literal["demo", "file", "hub"]
    path: str | None
    heldout_path: str | None
    dataset: str | None       # data=hub: a hub id, or a local file or save_to_disk folder
    config_name: str | None   # data=hub: the dataset's configuration
    split: str | None         # a hub dataset's or a DatasetDict folder's split
    columns: dict | None      # field -> the user's column name (harness.data.shapes.FIELDS)
    chat_template: str        # auto, none, or a .jinja file
    loss_on: Literal[LOSS_ON]  # type: ignore[valid-type]
    heldout_fraction: Annotated[float, Range(ge=0, lt=1)]
    validation_path: str | None  # rows to choose a learning rate on (tune=lr), never trained on or reported
    validation_fraction: Annotated[float, Range(ge=0, lt=1)]
    n_train: Positive
    n_heldout: Count
    n_validation: Count       # data=demo: validation questions, on words of their own
    seed: int
    min_prompt_tokens: Positive
    overlong: Literal[OVERLONG]  # type: ignore[valid-type]


@dataclass
class TrainConfig:
    max_steps: Positive
    batch_size: Positive
    grad_accum: Positive
    seq_len: Annotated[int, Range(ge=8)]
    lr_scheduler: Literal[SCHEDULERS]  # type: ignore[valid-type]
    lr_scheduler_kwargs: dict
    warmup_steps: Count
    max_grad_norm: Annotated[float, Range(ge=0)]
    weight_decay: Annotated[float, Range(ge=0)]
    optim: Literal[OPTIMIZERS]  # type: ignore[valid-type]
    precision: Literal[PRECISIONS]  # type: ignore[valid-type]
    gradient_checkpointing: bool
    logging_steps: Positive
    warmup_steps_excluded: Count
    tqdm: bool


@dataclass
class MMLUConfig:
    enabled: bool
    dir: str | None
    num_fewshot: Count
    limit: Positive | None
    batch_size: Positive


@dataclass
class InDomainConfig:
    enabled: bool
    limit: Positive | None
    batch_size: Positive


@dataclass
class ForgettingConfig:
    enabled: bool
    path: str | None
    max_tokens: Positive
    chunk_tokens: Annotated[int, Range(ge=2)]


@dataclass
class LatencyConfig:
    enabled: bool
    prompts: Positive
    reps: Annotated[int, Range(ge=MIN_LATENCY_REPS)]
    gen_tokens: Count


@dataclass
class VariantsConfig:
    enabled: bool
    counts: list[Annotated[int, Range(ge=1, le=MAX_VARIANTS)]]
    batch: Positive
    reps: Annotated[int, Range(ge=MIN_LATENCY_REPS)]
    switch_reps: Annotated[int, Range(ge=MIN_MEDIAN_REPS)]
    gen_tokens: Count


@dataclass
class EvalConfig:
    mmlu: MMLUConfig
    indomain: InDomainConfig
    forgetting: ForgettingConfig
    tasks: list[str]          # lm-eval tasks beside MMLU (its registry, or eval.include_path)
    include_path: str | None  # a folder of your own lm-eval task YAMLs
    tasks_limit: Positive | None
    on_random_weights: bool
    latency: LatencyConfig
    variants: VariantsConfig


@dataclass
class HardwareConfig:
    """A price preset (conf/hardware/*.yaml; harness.measure.pricing checks its prices)."""

    name: str
    price_per_device_hour_usd: Annotated[float, Range(gt=0)] | None
    price_per_core_hour_usd: Annotated[float, Range(gt=0)] | None
    price_source: str | None
    price_date: str | None
    match: list[str] | None
    exclude: list[str] | None
    memory_gib: list[float] | None
    datasheet_bf16_dense_tflops: Annotated[float, Range(gt=0)] | None
    datasheet_source: str | None


@dataclass
class FSDPConfig:
    version: Literal[1, 2]
    state_dict_type: Literal["SHARDED_STATE_DICT", "FULL_STATE_DICT"]
    offload_params: bool
    cpu_ram_efficient_loading: bool
    transformer_layer_cls_to_wrap: str | list[str] | None


@dataclass
class Zero3Config:
    offload_optimizer_device: Literal["none", "cpu", "nvme"]
    offload_param_device: Literal["none", "cpu", "nvme"]


@dataclass
class DistributedConfig:
    strategy: Literal[STRATEGIES]  # type: ignore[valid-type]
    num_processes: Positive
    num_machines: Positive
    machine_rank: Count
    main_process_ip: str | None
    main_process_port: Annotated[int, Range(ge=1, le=65535)]
    fsdp: FSDPConfig
    zero3: Zero3Config


@dataclass
class TrackingConfig:
    """conf/tracking/*.yaml: where results are also sent (harness.tracking); no result depends on it."""

    backend: Literal[TRACKERS]  # type: ignore[valid-type]
    uri: str | None           # MLflow tracking URI
    project: str              # MLflow experiment, W&B / Trackio project
    entity: str | None        # W&B entity
    dir: str | None           # local files (TensorBoard, W&B, Trackio); null: <results_dir>/<backend>
    group: str | None         # a sweep's group; null: model-data-<setting_key[:8]>
    live: bool                # stream training through the Trainer's report_to
    artifacts: bool           # the record and its answers as artifacts
    timeout_s: Annotated[float, Range(gt=0)]


@dataclass
class ParallelConfig:
    jobs: Positive | None
    gpus_per_job: Positive | None


@dataclass
class VerdictConfig:
    """The limits the report's verdict judges against (harness.report.verdict.Limits; a steering
    setting: no run id changes). harness-report's flags override them."""

    max_gap: Annotated[float, Range(gt=0, le=100)]  # pp
    variants: Positive
    target_tokens: Annotated[float, Range(gt=0)] | None
    target_model: str | None
    target_hardware: str | None
    budget_usd: Annotated[float, Range(gt=0)] | None
    task: str | None


@dataclass
class RunConfig:
    """conf/config.yaml: what harness-run composes for one job."""

    model: ModelConfig
    method: MethodConfig
    tune: TuneConfig
    data: DataConfig
    train: TrainConfig
    eval: EvalConfig
    hardware: HardwareConfig
    distributed: DistributedConfig
    seed: Count
    results_dir: str
    reports_dir: str
    force: bool
    isolate: bool
    report: bool
    projected_tokens: Annotated[float, Range(gt=0)] | None
    parallel: ParallelConfig
    verdict: VerdictConfig
    tracking: TrackingConfig


@dataclass
class EstimatorConfig:
    padded: bool


@dataclass
class EstimateConfig(RunConfig):
    """conf/estimate.yaml: harness-run's settings plus the estimator's own."""

    format: Literal["table", "json"]
    estimate: EstimatorConfig


# ---------------------------------------------------------------- checking a config against it


def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls, include_extras=True)


def _show(value: Any) -> str:
    return repr(value) if not isinstance(value, str) else f"'{value}'"


def _describe(hint: Any) -> str:
    """What a value of ``hint`` looks like, for an error message."""
    origin, args = get_origin(hint), get_args(hint)
    if origin is Annotated:
        bound = args[1].text() if isinstance(args[1], Range) else ""
        return f"{_describe(args[0])} {bound}".strip()
    if origin in (Union, types.UnionType):
        named = [_describe(a) for a in args if a is not type(None)]
        return " or ".join(named) + (" or null" if type(None) in args else "")
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in args)
    if origin is list:
        plural = {str: "strings", int: "integers", float: "numbers"}
        return f"a list of {plural.get(args[0], _describe(args[0]))}" if args else "a list"
    if hint is dict or origin is dict:
        return "a mapping"
    if is_dataclass(hint):
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(hint, str(hint))


def _fits(value: Any, hint: Any) -> bool:
    """Whether ``value`` is of type ``hint`` (ranges and nested groups are checked by ``_check``)."""
    origin, args = get_origin(hint), get_args(hint)
    if hint is Any:
        return True
    if origin is Annotated:
        return _fits(value, args[0]) and (not isinstance(args[1], Range) or args[1].holds(value))
    if origin in (Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if hint is type(None):
        return value is None
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin is list or hint is list:
        return isinstance(value, list) and (not args or all(_fits(v, args[0]) for v in value))
    if hint is dict or origin is dict:
        return isinstance(value, dict)
    if is_dataclass(hint):
        return isinstance(value, dict)
    raise TypeError(f"schema type {hint!r} is not supported")


def _group(hint: Any) -> type | None:
    """The dataclass inside ``hint`` (``GGUFConfig | None`` -> GGUFConfig), if any."""
    if is_dataclass(hint):
        return hint
    for a in get_args(hint):
        if is_dataclass(a):
            return a
    return None


def _check(value: Any, hint: Any, path: str) -> None:
    group = _group(hint)
    if group is not None and isinstance(value, dict):
        check_group(value, group, f"{path}.")
        return
    if not _fits(value, hint):
        raise UsageError(f"{path}={_show(value)} is invalid; give {_describe(hint)}")


def check_group(values: dict, cls: type, prefix: str = "") -> None:
    """Raise UsageError (one line) on the first key of ``values`` that ``cls`` has no field for,
    or whose value is not of the field's type."""
    hints = _hints(cls)
    known = [f.name for f in fields(cls)]
    for key, value in values.items():
        path = f"{prefix}{key}"
        if key not in hints:
            where = f"{prefix.rstrip('.')}" if prefix else "the config"
            close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
            hint = f"did you mean {prefix}{close[0]}? " if close else ""
            raise UsageError(f"{path} is not a setting of {where}; {hint}valid: {', '.join(known)}")
        _check(value, hints[key], path)


def validate(cfg: dict, schema: type = RunConfig) -> None:
    """Check a resolved config (Hydra's ``hydra`` node left out) against the schema; raise
    UsageError with one line naming the first bad setting. Nothing is changed."""
    check_group({k: v for k, v in cfg.items() if k != "hydra"}, schema)


def settings_of(cls: type = RunConfig, prefix: str = "") -> list[tuple[str, str]]:
    """(dotted name, what it takes) of every setting, for ``--help`` and the docs."""
    out = []
    for name, hint in _hints(cls).items():
        group = _group(hint)
        if group is not None and group is not hint and get_origin(hint) not in (Union, types.UnionType):
            group = None
        if group is not None:
            out += settings_of(group, f"{prefix}{name}.")
        else:
            out.append((f"{prefix}{name}", _describe(hint)))
    return out


# ---------------------------------------------------------------- composing


def group_options(group: str, dirs: list[Path] | None = None) -> list[str]:
    """The options of a config group (its YAML files), in the packaged and any extra folders."""
    return sorted({p.stem for d in (dirs or [CONF_DIR]) for p in (Path(d) / group).glob("*.yaml")})


def grid_point(grid, point) -> float:
    """The rate at ``point`` of ``grid``: tune=lr's ``${grid_point:${method.lr_grid},${tune.point}}``
    (conf/tune/lr.yaml; harness.tuning checks the grids)."""
    rates = list(grid)
    if point is None or not 0 <= int(point) < len(rates):
        raise ValueError(f"tune.point={point} is outside method.lr_grid ({len(rates)} rates: "
                         f"{', '.join(f'{r:g}' for r in rates)}); sweep tune.point=0..{len(rates) - 1}")
    return float(rates[int(point)])


def _register_resolvers() -> None:
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("grid_point"):
        OmegaConf.register_new_resolver("grid_point", grid_point)


_register_resolvers()


def compose(overrides: list[str] | tuple[str, ...] = (), config_name: str = "config") -> dict:
    """The resolved config of ``overrides`` (Hydra's compose API), ``hydra`` node left out."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name=config_name, overrides=list(overrides))
    resolved = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    return {k: v for k, v in resolved.items() if k != "hydra"}
