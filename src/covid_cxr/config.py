"""The typed configuration: every TOML file under configs/ loads into one of these dataclasses.

Unknown keys and wrong types are refused with the file and the key named, so a typo never
silently falls back to a default.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from covid_cxr.errors import ConfigError
from covid_cxr.imaging.preprocess import PreprocessConfig

T = TypeVar("T")


# ---------------------------------------------------------------- data (covid-cxr data build)


@dataclass(frozen=True)
class SourceSpec:
    """One public or user dataset to read. `path` is relative to the data root unless absolute.

    `kind` picks the reader (see covid_cxr.data.sources.READERS). `name` is the value of the
    manifest's `source` column (default: the folder or CSV name). `holdout` sends every image of
    the source to split "external", so a model can be tested on a hospital it never saw.
    `labels`, `views` and `limit` select a subset (e.g. COVID-19 PA only, at most 196 images).
    """

    kind: str
    path: str
    name: str = ""
    holdout: bool = False
    labels: list[str] = field(default_factory=list)
    views: list[str] = field(default_factory=list)
    limit: int = 0

    def __post_init__(self) -> None:
        if self.limit < 0:
            raise ValueError(f"limit must be >= 0 (0 = no limit), got {self.limit}")


@dataclass(frozen=True)
class SplitConfig:
    """Fractions of images per split, assigned whole patient groups at a time."""

    train: float = 0.7
    val: float = 0.15
    test: float = 0.15
    seed: int = 42

    def __post_init__(self) -> None:
        ratios = (self.train, self.val, self.test)
        if min(ratios) < 0 or self.train <= 0 or abs(sum(ratios) - 1.0) > 1e-6:
            raise ValueError(
                f"split ratios train={self.train}, val={self.val}, test={self.test} must be "
                "non-negative, train > 0, and sum to 1"
            )


@dataclass(frozen=True)
class DataRecipe:
    """A `covid-cxr data build` recipe (configs/data/*.toml).

    `balance`: "overall" downsamples the majority class (COVID vs the rest) before the split,
    "per-split" within each split. `near_duplicate_distance` is the largest Hamming distance
    between 64-bit perceptual hashes that still counts as the same picture (-1: off).
    `near_duplicates`: "group" keeps every copy but in one split; "drop" also keeps only the
    first copy (in source order), so no image is counted twice in a test set.
    """

    name: str
    sources: list[SourceSpec]
    split: SplitConfig = field(default_factory=SplitConfig)
    description: str = ""
    balance: Literal["none", "overall", "per-split"] = "none"
    near_duplicate_distance: int = 2
    near_duplicates: Literal["group", "drop"] = "group"

    def __post_init__(self) -> None:
        if not self.sources:
            raise ValueError("a recipe needs at least one [[sources]] entry")
        if self.near_duplicate_distance > 32:
            raise ValueError("near_duplicate_distance above 32 would group unrelated images")


# ---------------------------------------------------------------- training (covid-cxr train)


@dataclass(frozen=True)
class ModelConfig:
    name: str = "seed-cnn"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class AugmentConfig:
    """Random changes to each training image, applied to whole batches in memory.

    The seed recipe mirrors Keras' ImageDataGenerator(shear_range=0.2, zoom_range=0.2,
    horizontal_flip=True): `shear` is in degrees (as Keras 2.x reads shear_range, so 0.2 is
    almost nothing), `zoom` draws independent x and y scales in [1 - zoom, 1 + zoom] (above 1
    shows more of the image, as in Keras), and the empty border repeats the edge pixels
    (Keras' fill_mode="nearest"). The other keys are extras for the stronger models.

    `blur`, `noise`, `overlays` and `borders` imitate what hospitals' images differ in besides
    the disease (sharpness, noise, burnt-in markers and text, padding and collimation), so a
    model cannot tell the source, and with it the label, from them. They change the image only
    (never a mask), each image drawn on its own; all are off by default.
    """

    hflip: bool = False
    shear: float = 0.0
    zoom: float = 0.0
    rotation: float = 0.0  # degrees, uniform in [-rotation, rotation]
    translate: float = 0.0  # fraction of the side, uniform in [-translate, translate]
    crop_scale: float = 1.0  # random resized crop: keep an area fraction in [crop_scale, 1]
    brightness: float = 0.0  # add uniform [-b, b]
    contrast: float = 0.0  # scale about the image mean by uniform [1 - c, 1 + c]
    gamma: float = 0.0  # x ** exp(uniform [-g, g])
    fill: Literal["border", "zeros", "reflection"] = "border"
    # Sharpness (detector, resizing, processing): probability of a Gaussian blur of sigma
    # uniform in (0, blur_sigma] pixels at the input size.
    blur: float = 0.0
    blur_sigma: float = 1.5
    # Dose and detector noise: Gaussian noise of std uniform in [0, noise], every image.
    noise: float = 0.0
    # L/R markers and burnt-in text: probability of 1-3 flat bright or dark blocks, text-like
    # bars or frames, 2-8% of the side, mostly near the edges and corners.
    overlays: float = 0.0
    # Padding and collimation: probability of a black or white band on one or more sides,
    # each uniform in [0, border_max] of the side.
    borders: float = 0.0
    border_max: float = 0.08

    def __post_init__(self) -> None:
        if not 0.0 <= self.zoom < 1.0:
            raise ValueError(f"zoom must be in [0, 1), got {self.zoom}")
        if not 0.1 <= self.crop_scale <= 1.0:
            raise ValueError(f"crop_scale must be in [0.1, 1], got {self.crop_scale}")
        if min(self.shear, self.rotation, self.translate, self.brightness, self.contrast) < 0:
            raise ValueError("augmentation strengths must be >= 0")
        for key in ("blur", "overlays", "borders"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ValueError(f"{key} is a probability in [0, 1], got {getattr(self, key)}")
        if not 0.0 <= self.noise <= 1.0:
            raise ValueError(f"noise (the largest std) must be in [0, 1], got {self.noise}")
        if self.blur_sigma <= 0:
            raise ValueError(f"blur_sigma must be > 0 pixels, got {self.blur_sigma}")
        if not 0.0 <= self.border_max < 0.5:
            raise ValueError(f"border_max must be in [0, 0.5) of the side, got {self.border_max}")


@dataclass(frozen=True)
class OptimConfig:
    """Optimizer and learning-rate schedule (the seed recipe: Adam 1e-3, constant)."""

    name: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    schedule: Literal["none", "cosine", "step", "plateau"] = "none"
    warmup_epochs: int = 0
    min_lr: float = 0.0  # cosine floor
    step_epochs: int = 10  # step: multiply by `factor` every step_epochs
    factor: float = 0.1  # step and plateau decay factor
    plateau_patience: int = 2  # plateau: epochs without val AUC gain before decaying


@dataclass(frozen=True)
class SamplingConfig:
    """Which training rows are used and how batches are drawn.

    `sampler`: "uniform" shuffles; "source_balanced" draws every (source, COVID-19 or not) group
    equally often (weights 1 / group size, with replacement), so no hospital or class dominates
    and a model cannot win by learning which source an image came from. `class_weights` "balanced"
    weights the loss by inverse class frequency. `train_sources` / `exclude_sources` pick the
    sources that train (e.g. leave one hospital out); validation uses the same sources, so a
    held-out hospital never influences which epoch is kept.
    """

    sampler: Literal["uniform", "source_balanced"] = "uniform"
    class_weights: Literal["none", "balanced"] = "none"
    train_sources: list[str] = field(default_factory=list)
    exclude_sources: list[str] = field(default_factory=list)
    epoch_size: int = 0  # images per epoch for the balanced sampler (0: the training set size)


@dataclass(frozen=True)
class RuntimeConfig:
    """How fast it runs; none of these change what is learned beyond bf16 rounding."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = 0  # torch intra-op threads on CPU (0: the cores, shared by local processes)
    reuse_memory: bool = True  # keep freed memory in the heap (see covid_cxr.training.cpu)
    bf16: bool = True  # bfloat16 autocast (AVX512-BF16 / AMX on CPU, tensor cores on CUDA)
    channels_last: bool = True
    compile: bool = False  # torch.compile the model (slow to start; measure before enabling)
    cache_dtype: Literal["uint8", "float16"] = "float16"
    decode_workers: int = 2  # processes decoding images into the in-memory cache
    cache_dir: str = ""  # also keep decoded inputs on disk here, reused by later runs ("": off)
    eval_batch_size: int = 64


@dataclass(frozen=True)
class TrainConfig:
    """A `covid-cxr train` recipe (configs/train/*.toml). `manifest` is relative to the current
    directory unless absolute; rows with split "train" fit the model and "val" select the epoch.

    `task` picks what is learnt (covid_cxr.training.tasks: "classification", or a task another
    module registers); models and checkpoints without one are classification ones.
    """

    name: str
    manifest: str
    task: str = "classification"
    model: ModelConfig = field(default_factory=ModelConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    seed: int = 42
    description: str = ""
    epochs: int = 10
    batch_size: int = 32
    patience: int = 0  # early stopping: epochs without a val AUC gain (0: never stop early)
    # The epoch kept: plain validation AUC, or AUC with every (source, class) group weighted
    # equally (an easy majority source cannot dominate the choice).
    select_metric: Literal["val_auc", "val_auc_balanced", "val_dice", "val_dice_balanced"] = (
        "val_auc"
    )
    max_images: int = 0  # use at most this many images per split (0: all), for quick runs
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be >= 1")
        if self.patience < 0 or self.max_images < 0:
            raise ValueError("patience and max_images must be >= 0")


# ---------------------------------------------------------------- loading


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _convert_union(value: Any, tp: Any, where: str) -> Any:
    for option in typing.get_args(tp):
        if option is type(None) and value is None:
            return None
        with contextlib.suppress(ConfigError):
            return _convert(value, option, where)
    raise ConfigError(f"{where}: {value!r} matches none of {typing.get_args(tp)}")


def _convert_literal(value: Any, tp: Any, where: str) -> Any:
    if value not in typing.get_args(tp):
        raise ConfigError(f"{where}: must be one of {list(typing.get_args(tp))}, got {value!r}")
    return value


def _convert_list(value: Any, tp: Any, where: str) -> Any:
    if not isinstance(value, list):
        raise ConfigError(f"{where}: expected a list, got {value!r}")
    (item,) = typing.get_args(tp) or (Any,)
    return [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]


def _convert_dict(value: Any, tp: Any, where: str) -> Any:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a table, got {value!r}")
    return dict(value)


def _convert_scalar(value: Any, tp: Any, where: str) -> Any:
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool):
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported config type {tp!r}")


_CONVERTERS = {
    typing.Union: _convert_union,
    types.UnionType: _convert_union,
    Literal: _convert_literal,
    list: _convert_list,
    dict: _convert_dict,
}


def _convert(value: Any, tp: Any, where: str) -> Any:
    """`value` from TOML as type `tp`, or a ConfigError naming `where` and what was expected."""
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        return from_dict(tp, value, where)
    converter = _CONVERTERS.get(typing.get_origin(tp), _convert_scalar)
    return converter(value, tp, where)


def from_dict(cls: type[T], data: dict[str, Any], where: str = "config") -> T:
    """Build dataclass `cls` from a TOML table, refusing unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(fields)}")
    kwargs = {name: _convert(value, hints[name], f"{where}.{name}") for name, value in data.items()}
    missing = [
        name
        for name, f in fields.items()
        if name not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{where}: missing required key(s) {missing}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def to_dict(config: Any) -> dict[str, Any]:
    """The plain-dict form, for writing the resolved config next to a run's results."""
    return dataclasses.asdict(config)


def load_config(path: str | Path, cls: type[T]) -> T:
    """Read a TOML file into `cls`; errors name the file and the offending key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    return from_dict(cls, data, where=str(path))


def dump_toml(data: dict[str, Any]) -> str:
    """Write a plain nested dict (as from `to_dict`) as TOML; enough for resolved configs."""
    scalars = {k: v for k, v in data.items() if not isinstance(v, dict) and not _is_table_list(v)}
    tables = {k: v for k, v in data.items() if isinstance(v, dict)}
    table_lists = {k: v for k, v in data.items() if _is_table_list(v)}
    lines = [f"{k} = {_toml_value(v)}" for k, v in scalars.items() if v is not None]
    for key, table in tables.items():
        lines += ["", f"[{key}]", *_inline_lines(table)]
    for key, items in table_lists.items():
        for item in items:
            lines += ["", f"[[{key}]]", *_inline_lines(item)]
    return "\n".join(lines) + "\n"


def _is_table_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def _inline_lines(table: dict[str, Any]) -> list[str]:
    return [f"{k} = {_toml_value(v)}" for k, v in table.items() if v is not None]


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        # JSON's string escapes are all valid TOML; DEL is the one control JSON leaves raw.
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {value!r} as TOML")
