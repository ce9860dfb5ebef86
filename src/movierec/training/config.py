"""Run configuration: YAML files in `configs/`, overridden by flags and dotted `section.key=value` pairs.

Layering (lowest to highest): the defaults below, the YAML file, `key=value` overrides, then the named
flags (`--epochs`, `--data`, ...). Unknown keys are errors, so a typo never silently trains the wrong model.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from movierec.errors import ConfigError
from movierec.models.base import MODELS, ModelSection, model_class


@dataclass
class DataSection:
    path: str = "data/synthetic"
    fraction: float | None = None
    shards: str | None = None
    verify_checksums: bool = True


@dataclass
class TrainSection:
    # the run's length: epochs, or steps (optimizer steps, whatever the data's size: a recipe tuned in steps
    # on one dataset keeps its schedule on another); set one and leave the other null
    epochs: int | None = 200
    steps: int | None = None
    # sequences per batch, or auto: the largest that fits, halving from max_batch_size on out-of-memory (CUDA;
    # on CPU the memory_limit_gb budget against a trial step's peak); the chosen size is written back here
    batch_size: int | str = 128
    max_batch_size: int = 2048
    memory_limit_gb: float | None = None  # auto on CPU: the process's budget (None: resident + 90 % available)
    lr_scaling: str = "none"  # auto: how lr (meant for max_batch_size) follows the chosen size: none|linear|sqrt
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = 0.0
    loss: str = "bce"  # bce | gbce | sampled-softmax | ce
    # train the first `start_loss_steps` optimizer steps with `start_loss` instead of `loss`, then switch:
    # BCE leaves the popularity plateau that gbce and the softmax losses sit on for their first epochs
    start_loss: str | None = None
    start_loss_steps: int | str = 0  # steps, or "N%" of the run's steps (as warmup_steps, eval.*_steps)
    num_negatives: int = 256  # sampled-softmax: per batch or sequence (negatives_per); gbce: per sequence
    gbce_t: float = 0.75  # gbce calibration: 0 is plain BCE over the negatives, 1 fully calibrated (gSASRec's 0.75)
    negative_sampling: str = "uniform"  # sampled-softmax: uniform | popularity (with log-Q correction)
    # sampled-softmax: one draw of num_negatives for the whole batch (one matrix product), or one per sequence
    # (a batch sees batch_size times as many distinct negatives, at the same cost in products)
    negatives_per: str = "batch"  # batch | sequence
    # softmax losses (sampled-softmax, ce): logits divided by this (null: 1); with a model that scores by cosine
    # similarity (hstu) it is what makes the softmax sharp (the HSTU recipe: 0.05)
    temperature: float | None = None
    precision: str = "auto"  # fp32 | fp16 | bf16 | auto (fp16 on CUDA, fp32 on CPU)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 42
    bucket_batches: int = 32  # sort users by length within windows of this many batches (0: off)
    # SSE-PT++: the probability that a user with more than max_len + 1 training items trains on a uniformly
    # drawn older window of max_len items instead of the latest (0: always the latest, as SSE-PT and SASRec)
    window_prob: float = 0.0
    # weight each batch's mean loss by its share of target positions, so every position weighs the same
    # across length-bucketed batches, as with the official sampler's random batches (false: every batch
    # weighs the same, which over-weights short sequences and cost ~0.01 test NDCG@10 on ML-1M)
    token_weighting: bool = True
    num_threads: int | None = None
    grad_clip: float | None = None
    # gradient accumulation: each optimizer step sums this many batches per process; the global batch is
    # batch_size x grad_accumulation x world size (processes under torchrun); lr is not rescaled
    grad_accumulation: int = 1
    max_steps: int | None = None  # stop after this many optimizer steps (with checkpoints and test metrics)
    # stop at the first epoch end after this many minutes of training and validation (the run's own clock,
    # summed over resumed segments), then test the best checkpoint as usual: "the best model in 30 minutes"
    max_minutes: float | None = None
    # adam: dense Adam on every parameter; sparse-adam: the item and user tables get row-sparse gradients and
    # a lazy Adam (torch.optim.SparseAdam) that touches only the rows a batch used; auto: sparse-adam when the
    # item table has more rows than SPARSE_ROWS_PER_TOKEN x (batch_size x max_len), else adam (see results.md)
    optimizer: str = "auto"
    # learning-rate schedule, a function of the optimizer step (so a resumed run continues it exactly):
    # linear warm-up from 0 over warmup_steps, then constant, or a cosine decay to lr x min_lr_ratio at the
    # last step (train.max_steps if set, else train.epochs x steps per epoch)
    warmup_steps: int | str = 0
    lr_schedule: str = "constant"  # constant | cosine
    min_lr_ratio: float = 0.0


@dataclass
class EvalSection:
    # Validation and early stopping count optimizer steps, not epochs, so that the same config behaves the
    # same on 600 users and on 6 million: validate at the end of the first epoch that is at least
    # every_steps steps past the previous validation; stop once patience_steps steps have passed without a
    # validation gain of at least min_delta (smaller gains still update best.ckpt), never before min_steps.
    # Each of these is a number of steps or "N%" of the run's steps, resolved when the run starts.
    every_steps: int | str = 250
    patience_steps: int | str | None = 5000  # null: no early stopping (best.ckpt still keeps the best)
    min_delta: float = 0.001
    min_steps: int | str = 0
    # also score the test split at each validation (eval.protocol only) for time-to-quality curves
    # (bench/time_to_quality.py); it never selects anything, and the elapsed-time clock pauses while it runs
    test_curve: bool = False
    protocol: str = "sampled-uniform-100"  # protocol of the early-stopping metric
    metric: str = "ndcg@10"
    protocols: list[str] = field(default_factory=lambda: ["full", "sampled-uniform-100", "sampled-popularity-100"])
    ks: list[int] = field(default_factory=lambda: [1, 5, 10, 20])
    seed: int = 0
    batch_size: int = 256
    max_users: int | None = None  # validate and test on a seeded, fixed sample of this many users (None: all)
    # validate (early stopping, best.ckpt) on a seeded, fixed sample of this many users, and test on max_users:
    # validation runs many times a run, the test once, so a small sample saves time where it is spent
    validation_users: int | None = None
    item_chunk: int = 32768  # full ranking scores the catalog this many items at a time (bounded memory)


@dataclass
class TrackingSection:
    uri: str | None = None  # None: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory
    experiment: str = "movierec"
    run_name: str | None = None
    system_metrics: bool = True
    system_metrics_interval: float = 10.0  # seconds between CPU/memory/GPU samples
    log_model: bool = True


@dataclass
class InitSection:
    from_checkpoint: str | None = None  # a movierec checkpoint or run folder, or a plain PyTorch state dict
    map_by_id: bool = True  # copy item/user vectors by MovieLens movieId/userId across datasets
    map: str | None = None  # a state dict's tensor names -> ours: YAML rename rules (configs/init-maps/)


@dataclass
class RunConfig:
    data: DataSection = field(default_factory=DataSection)
    model: ModelSection = field(default_factory=ModelSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    tracking: TrackingSection = field(default_factory=TrackingSection)
    init: InitSection = field(default_factory=InitSection)
    run_dir: str = "runs/default"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """`section.key -> value`, as logged to MLflow."""
        out: dict[str, Any] = {}
        for key, value in self.to_dict().items():
            if isinstance(value, dict):
                out.update({f"{key}.{k}": v for k, v in value.items()})
            else:
                out[key] = value
        return out


REPLACED = {  # keys of older configs, for the error message; checkpoints that hold them drop them on resume
    "eval.every": "eval.every_steps, counted in optimizer steps",
    "eval.patience": "eval.patience_steps, counted in optimizer steps",
}


def _merge(target: Any, values: dict[str, Any], where: str, given: set[str] | None = None) -> None:
    """Set `values` into the config dataclass `target`, type-checked; the dotted keys set are added to `given`."""
    for key, value in values.items():
        if not dataclasses.is_dataclass(target) or key not in {f.name for f in dataclasses.fields(target)}:
            known = ", ".join(f.name for f in dataclasses.fields(target))
            replaced = REPLACED.get(f"{where}{key}")
            hint = f" (it is now {replaced})" if replaced else ""
            raise ConfigError(f"unknown config key '{where}{key}'{hint}; known here: {known}")
        current = getattr(target, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"config section {where}{key} must be a mapping, got {value!r}")
            _merge(current, value, f"{where}{key}.", given)
        else:
            setattr(target, key, _coerce(value, typing.get_type_hints(type(target))[key], f"{where}{key}"))
            if given is not None:
                given.add(f"{where}{key}")


def _coerce(value: Any, kind: Any, name: str) -> Any:
    """`value` as the field's declared type `kind` (int, float, bool, str, X | None, int | str for `auto`,
    tuple[float, float], list[int], list[str]), or a one-line ConfigError. An integer field never takes a
    fraction, and a number written as text (YAML reads 1e-3 as a string) is parsed."""
    options = typing.get_args(kind) if typing.get_origin(kind) in (typing.Union, types.UnionType) else (kind,)
    if value is None:
        if type(None) in options:
            return None
        raise ConfigError(f"{name} needs a value, got null")
    concrete = [option for option in options if option is not type(None)]
    if concrete == [int, str]:  # a size that may be `auto`, or steps that may be a share of the run
        if isinstance(value, str) and (value == "auto" or value.strip().endswith("%")):
            return value.strip()
        if isinstance(value, str) and not value.strip().lstrip("-").isdigit():
            raise ConfigError(f"{name} must be a whole number, or auto / N% where allowed, got {value!r}")
    kind = concrete[0]
    origin = typing.get_origin(kind)
    if origin in (tuple, list):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        items = typing.get_args(kind)
        if origin is tuple and len(value) != len(items):
            raise ConfigError(f"{name} must be a list of {len(items)} values, got {list(value)!r}")
        item_kinds = items if origin is tuple else [items[0]] * len(value)
        return origin(_coerce(v, k, f"{name}[{i}]") for i, (v, k) in enumerate(zip(value, item_kinds, strict=True)))
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {value!r}")
        return value
    if kind in (int, float):
        return _number(value, kind, name)
    if isinstance(value, dict | list | tuple):
        raise ConfigError(f"{name} must be a single value, got {value!r}")
    return str(value)


def _number(value: Any, kind: type, name: str) -> int | float:
    if isinstance(value, bool | dict | list | tuple):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    try:
        number = float(value) if isinstance(value, str) else value
        if kind is float:
            return float(number)
        if isinstance(number, float):
            if not number.is_integer():
                raise ConfigError(f"{name} must be a whole number, got {value!r}")
            number = int(number)
        return int(number)
    except (TypeError, ValueError, OverflowError) as exc:
        article = "an integer" if kind is int else "a number"
        raise ConfigError(f"{name} must be {article}, got {value!r}") from exc


def read_yaml(path: Path) -> Any:
    """A YAML file's content, or a one-line ConfigError: not text, not YAML (its first problem and where),
    nested beyond reason, or a tag asking for a Python object (safe_load refuses it; nothing runs)."""
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not a text file (byte {exc.start} is not UTF-8); give a YAML config") from exc
    except RecursionError as exc:
        raise ConfigError(f"{path} is nested too deeply to be a run config") from exc
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{path} is not valid YAML: {problem}{where}") from exc


def parse_override(text: str) -> dict[str, Any]:
    """`train.lr=0.01` -> {"train": {"lr": 0.01}}; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except (yaml.YAMLError, RecursionError) as exc:
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise ConfigError(f"override {text!r}: cannot parse value ({problem})") from exc
    nested: dict[str, Any] = value
    for part in reversed(key.strip().split(".")):
        nested = {part: nested}
    return nested


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    flags: dict[str, Any] | None = None,
    base: RunConfig | None = None,
) -> RunConfig:
    """The one place a run's config is assembled, lowest layer first: `base` (a resumed run's config) or the
    defaults, the YAML file at `path`, `section.key=value` overrides, then named flags (`{"train.epochs": 5}`,
    None = not given). Every layer goes through the same type checks; the result is validated, with the
    values the model kind forces already set."""
    config = base or RunConfig()
    given: set[str] = set()  # the keys the file, overrides and flags set (not the base's)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist (shipped configs are in configs/)")
        values = read_yaml(path)
        if not isinstance(values, dict):
            raise ConfigError(f"{path} must hold a mapping of config sections")
        _merge(config, values, "", given)
    from_file, file_kind, command_line = set(given), config.model.kind, set()
    for override in overrides:
        _merge(config, parse_override(override), "", command_line)
    for key, value in (flags or {}).items():
        if value is not None:
            nested: Any = value
            for part in reversed(key.split(".")):
                nested = {part: nested}
            _merge(config, nested, "", command_line)
    if config.model.kind != file_kind:  # `--config ml-1m-sse-pt.yaml model.kind=sasrec`: the ablation of a recipe
        from_file -= drop_model_options_of_another_kind(config, from_file - command_line)
    given = from_file | command_line
    validate(config, given)
    return config


def drop_model_options_of_another_kind(config: RunConfig, keys: set[str]) -> set[str]:
    """Reset to their defaults the model options among `keys` (set by a config file written for another
    kind) that the kind chosen on the command line does not use; returns the keys reset. Options the command
    line itself sets are still checked."""
    if config.model.kind not in MODELS:  # validate names the kinds there are
        return set()
    options = model_class(config.model.kind).options(config.model.kind)
    if options is None:
        return set()
    defaults = ModelSection()
    dropped = {key for key in keys if key.startswith("model.") and key.removeprefix("model.") not in options}
    for key in dropped:
        name = key.removeprefix("model.")
        setattr(config.model, name, getattr(defaults, name))
    return dropped


# keys renamed since checkpoints were first written: (section, old) -> new
RENAMED = {("init", "map_items_by_movie_id"): "map_by_id"}


def config_from_dict(values: dict[str, Any]) -> RunConfig:
    """A config from a checkpoint's saved dict (keys renamed since it was written are carried over)."""
    values = {k: dict(v) if isinstance(v, dict) else v for k, v in values.items()}
    for (section, old), new in RENAMED.items():
        if old in values.get(section, {}):
            values[section][new] = values[section].pop(old)
    for dotted in REPLACED:  # epoch-counted early stopping of older runs: the step-counted defaults apply
        section, old = dotted.split(".")
        values.get(section, {}).pop(old, None)
    config = RunConfig()
    _merge(config, values, "")
    return config


@dataclass(frozen=True)
class Limit:
    """The valid range of a numeric option: [low, high], or open at an end; `null` says what None means."""

    low: float
    high: float
    low_open: bool = False
    high_open: bool = False
    null: str = ""

    def describe(self) -> str:
        left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
        return f"in {left}{self.low:g}, {self.high:g}{right}" + (f" (or null: {self.null})" if self.null else "")

    def holds(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return math.isfinite(value) and above and below


LR_SCALINGS = ("none", "linear", "sqrt")  # how lr follows train.batch_size auto (training/batch_size.py)
SEEDS = Limit(0, 2**63 - 1)
STEPS = Limit(1, 10**12)
MAX_TABLE_WIDTH = 65_536
# Every number a run config holds, with its range: a value outside it is a one-line ConfigError naming the
# option, however it arrived (YAML, KEY=VALUE, flag, a resumed run's config). NaN and inf are never valid.
# docs/architecture.md ("What is checked where") lists them; tests/test_configs.py tries every edge.
LIMITS: dict[str, Limit] = {
    "data.fraction": Limit(0, 1, low_open=True, null="every shard"),
    "model.max_len": Limit(1, 65_536),
    "model.d_item": Limit(1, MAX_TABLE_WIDTH),
    "model.d_user": Limit(0, MAX_TABLE_WIDTH),
    "model.num_blocks": Limit(1, 256),
    "model.num_heads": Limit(1, 1024),
    "model.dropout": Limit(0, 1, high_open=True),
    "model.keep_user": Limit(0, 1, low_open=True),
    "model.keep_item": Limit(0, 1, low_open=True),
    "model.mask_prob": Limit(0, 1, low_open=True, high_open=True),
    "train.epochs": Limit(1, 10**6, null="the run's length is train.steps"),
    "train.steps": Limit(1, 10**12, null="the run's length is train.epochs"),
    "train.batch_size": Limit(1, 2**20),
    "train.max_batch_size": Limit(1, 2**20),
    "train.memory_limit_gb": Limit(0, 2**20, low_open=True, null="resident + 90 % of the available memory"),
    "train.lr": Limit(0, 10, low_open=True),
    "train.betas": Limit(0, 1, high_open=True),
    "train.weight_decay": Limit(0, 10),
    "train.start_loss_steps": Limit(0, 10**12),
    "train.num_negatives": Limit(1, 65_536),
    "train.temperature": Limit(0, 100, low_open=True, null="1: logits as the model scores them"),
    "train.gbce_t": Limit(0, 1),
    "train.seed": SEEDS,
    "train.bucket_batches": Limit(0, 10**6),
    "train.window_prob": Limit(0, 1),
    "train.num_threads": Limit(1, 4096, null="torch's choice"),
    "train.grad_clip": Limit(0, 10**6, null="no clipping; 0 also means no clipping"),
    "train.grad_accumulation": Limit(1, 10**4),
    "train.max_steps": Limit(1, 10**12, null="no limit"),
    "train.max_minutes": Limit(0, 10**7, low_open=True, null="no limit"),
    "train.warmup_steps": Limit(0, 10**12),
    "train.min_lr_ratio": Limit(0, 1),
    "eval.every_steps": STEPS,
    "eval.patience_steps": Limit(1, 10**12, null="no early stopping"),
    "eval.min_delta": Limit(0, 1),
    "eval.min_steps": Limit(0, 10**12),
    "eval.ks": Limit(1, 10_000),
    "eval.seed": SEEDS,
    "eval.batch_size": Limit(1, 2**20),
    "eval.max_users": Limit(1, 10**10, null="every user"),
    "eval.validation_users": Limit(1, 10**10, null="eval.max_users"),
    "eval.item_chunk": Limit(1, 2**24),
    "tracking.system_metrics_interval": Limit(0, 86_400, low_open=True),
}


# the command-line flags of `movierec train` that set an option, named in its error message
FLAGS = {
    "train.epochs": "--epochs", "train.steps": "--steps", "train.seed": "--seed", "train.batch_size": "--batch-size",
    "train.max_steps": "--max-steps", "train.max_minutes": "--max-minutes", "data.fraction": "--fraction",
}  # fmt: skip


SHARE_OF_RUN = ("train.warmup_steps", "train.start_loss_steps", "eval.every_steps", "eval.patience_steps",
                "eval.min_steps")  # options that may be "N%" of the run's steps  # fmt: skip


def share_of_run(text: str, key: str) -> float:
    """The fraction "N%" stands for (0 < N <= 100), or a one-line ConfigError naming `key`."""
    try:
        share = float(text.removesuffix("%")) / 100
    except ValueError:
        share = math.nan
    if not (text.endswith("%") and 0 < share <= 1):
        raise ConfigError(f"{key} must be a number of steps or a share of the run like 6%, got {text!r}")
    return share


def check_limits(config: RunConfig) -> None:
    """Every numeric option within LIMITS (list elements each); `auto` and "N%" where they are allowed."""
    for key, value in config.flat().items():
        limit = LIMITS.get(key)
        if isinstance(value, str) and key in SHARE_OF_RUN:
            share_of_run(value, key)
            continue
        if limit is None or value is None or value == "auto":
            continue
        for element in value if isinstance(value, list | tuple) else [value]:
            if not limit.holds(element):
                name = f"{key} ({FLAGS[key]})" if key in FLAGS else key
                raise ConfigError(f"{name} must be {limit.describe()}, got {element!r}")


def check_model_options(config: RunConfig, given: set[str]) -> None:
    """An option of the `model:` section that the chosen kind does not use is an error, never ignored."""
    options = model_class(config.model.kind).options(config.model.kind)
    if options is None:  # a kind that reads every option
        return
    unused = sorted(key for key in given if key.startswith("model.") and key.removeprefix("model.") not in options)
    if unused:
        raise ConfigError(
            f"{', '.join(unused)} {'does' if len(unused) == 1 else 'do'} not apply to model.kind "
            f"{config.model.kind} (its options: {', '.join(sorted(options))})"
        )


def validate(config: RunConfig, given: set[str] = frozenset()) -> None:
    from movierec.evaluation.evaluate import check_protocols
    from movierec.training.losses import LOSSES

    check_limits(config)
    check_protocols([config.eval.protocol], "eval.protocol")
    check_protocols(config.eval.protocols, "eval.protocols")
    t, m, e = config.train, config.model, config.eval
    checks = [
        (m.kind in MODELS, f"model.kind must be one of {', '.join(sorted(MODELS))}, got {m.kind!r}"),
        (t.loss in LOSSES, f"train.loss must be one of {', '.join(LOSSES)}, got {t.loss!r}"),
        (
            t.start_loss is None or (t.start_loss in LOSSES and (isinstance(t.start_loss_steps, str)
                                                                  or t.start_loss_steps > 0)),
            f"train.start_loss must be one of {', '.join(LOSSES)} with train.start_loss_steps > 0, "
            f"got {t.start_loss!r} for {t.start_loss_steps} steps",
        ),
        (
            t.precision in ("fp32", "fp16", "bf16", "auto"),
            f"train.precision must be fp32|fp16|bf16|auto, got {t.precision!r}",
        ),
        (t.negative_sampling in ("uniform", "popularity"), "train.negative_sampling must be uniform or popularity"),
        (t.negatives_per in ("batch", "sequence"), "train.negatives_per must be batch or sequence"),
        (t.lr_scaling in LR_SCALINGS, f"train.lr_scaling must be one of {LR_SCALINGS}, got {t.lr_scaling!r}"),
        (t.batch_size == "auto" or isinstance(t.batch_size, int), "train.batch_size must be a whole number or auto"),
        ((t.epochs is None) != (t.steps is None),
         f"give the run's length as train.epochs or as train.steps, one of them null (got {t.epochs} and {t.steps})"),
        (t.optimizer in ("auto", "adam", "sparse-adam"),
         f"train.optimizer must be auto|adam|sparse-adam, got {t.optimizer!r}"),
        (not (t.optimizer == "sparse-adam" and "ce" in (t.loss, t.start_loss)),
         "train.optimizer=sparse-adam cannot train loss ce (its softmax touches every item row); use adam or auto"),
        (not (t.optimizer == "sparse-adam" and t.weight_decay), "train.optimizer=sparse-adam has no weight decay"),
        (t.lr_schedule in ("constant", "cosine"), f"train.lr_schedule must be constant|cosine, got {t.lr_schedule!r}"),
        (e.metric == "mrr" or (e.metric.split("@")[0] in ("ndcg", "hr") and e.metric.split("@")[-1].isdigit()
                               and int(e.metric.split("@")[-1]) in e.ks),
         f"eval.metric must be mrr, or ndcg@K / hr@K with K in eval.ks {e.ks}, got {e.metric!r}"),
    ]  # fmt: skip
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    check_model_options(config, set(given))
    try:  # what the kind forces (SASRec: d_user 0, no SSE) is set here, so config.yaml and MLflow show it
        model_class(m.kind).resolve(m)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def run_length(config: RunConfig, steps_per_epoch: int) -> int:
    """The run's optimizer steps: train.steps or train.epochs x steps per epoch, capped by train.max_steps."""
    t = config.train
    length = t.steps if t.steps is not None else t.epochs * steps_per_epoch
    return min(length, t.max_steps) if t.max_steps is not None else length


def resolve_schedule(config: RunConfig, steps_per_epoch: int) -> list[str]:
    """Turn the "N%" options into steps of this run, in place (so config.yaml, MLflow and a resume hold steps),
    and say which settings cannot take effect on a run this long: the warnings, one phrase each."""
    t, e = config.train, config.eval
    length = run_length(config, steps_per_epoch)
    for key in SHARE_OF_RUN:
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        if isinstance(value, str):
            least = 1 if name in ("every_steps", "patience_steps") else 0
            setattr(getattr(config, section), name, max(least, round(share_of_run(value, key) * length)))
    warnings = []
    if t.start_loss is not None and t.start_loss_steps >= length:
        warnings.append(f"train.start_loss_steps {t.start_loss_steps} is past the run's {length} steps, so "
                        f"train.loss {t.loss} never starts")  # fmt: skip
    if t.warmup_steps > length / 3:
        warnings.append(f"the warm-up takes {t.warmup_steps} of the run's {length} steps (over a third)")
    validations = length // e.every_steps + (length % e.every_steps > 0)
    if validations < 3:
        warnings.append(f"eval.every_steps {e.every_steps} validates only {validations} time(s) in {length} steps")
    if e.patience_steps is not None and e.patience_steps >= length:
        warnings.append(f"eval.patience_steps {e.patience_steps} is not shorter than the run ({length} steps): "
                        "early stopping cannot happen (null says so without a warning)")  # fmt: skip
    return warnings


def dump_config(config: RunConfig) -> str:
    data = config.to_dict()
    data["train"]["betas"] = list(data["train"]["betas"])
    return yaml.safe_dump(data, sort_keys=False)
