"""Every knob of the web service in one typed place, read from COVID_CXR_* and the CLI.

The CLI writes the resolved settings back to the environment (`to_env`) so that each uvicorn
worker process, which imports the app by name, builds the very same settings (`from_env`).
"""

from __future__ import annotations

import dataclasses
import os
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from covid_cxr.errors import ConfigError

ENV_PREFIX = "COVID_CXR_"
MIB = 1024 * 1024


@dataclass(frozen=True)
class ServiceSettings:
    """How `covid-cxr serve` runs; each field is also env var COVID_CXR_<FIELD NAME>.

    model: ONNX file or checkpoint; None serves the shipped default model.
    threads: intra-op threads per inference worker (None: the runtime's choice).
    inference_workers: predictions running at once; queue_size more may wait, and beyond
        that requests get 503 at once instead of piling up.
    max_upload_mb: largest single file; max_batch_mb: largest batch request body.
    max_pixels: decompression-bomb guard, checked from the image header before decoding.
        4096 x 4096 (16.8 M): more than a chest radiograph needs (the model sees 224 px; most
        detectors give 3,000 x 3,000, 100 um plates 3,500 x 4,300), and a request costs ~10
        bytes a pixel at its peak (float32 pixels plus preprocessing copies), so two inference
        workers at the limit stay near 500 MiB, under 600 MiB (tests/test_hostile_inputs.py
        measures it).
    image_max_side: longest side of the heat-map and preview PNGs sent back.
    api_key: when set, /api/* needs header X-API-Key; the page and health checks stay open.
    cors_origins: origins allowed to call the API from a browser; empty: CORS off.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    model: str | None = None
    operating_point: str | None = None
    threads: int | None = 1
    inference_workers: int = 2
    queue_size: int = 32
    max_upload_mb: float = 20.0
    max_batch_files: int = 16
    max_batch_mb: float = 100.0
    max_pixels: int = 4096 * 4096
    upload_timeout_s: float = 60.0
    image_max_side: int = 1024
    api_key: str | None = None
    cors_origins: tuple[str, ...] = ()
    access_log: bool = True
    log_level: str = "info"

    def __post_init__(self) -> None:
        checks = {
            "port": 0 <= self.port <= 65535,
            "workers": self.workers >= 1,
            "threads": self.threads is None or self.threads >= 1,
            "inference_workers": self.inference_workers >= 1,
            "queue_size": self.queue_size >= 0,
            "max_upload_mb": self.max_upload_mb > 0,
            "max_batch_files": self.max_batch_files >= 1,
            "max_batch_mb": self.max_batch_mb >= self.max_upload_mb,
            "max_pixels": self.max_pixels >= 64 * 64,
            "upload_timeout_s": self.upload_timeout_s > 0,
            "image_max_side": 64 <= self.image_max_side <= 8192,
            "api_key": self.api_key is None or len(self.api_key) >= 8,
            "log_level": self.log_level in ("critical", "error", "warning", "info", "debug"),
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ConfigError(
                f"invalid service setting(s) {bad}: "
                + ", ".join(f"{name}={getattr(self, name)!r}" for name in bad)
                + " (max_batch_mb must be at least max_upload_mb; an API key has >= 8 characters)"
            )

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * MIB)

    @property
    def max_batch_bytes(self) -> int:
        return int(self.max_batch_mb * MIB)

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, **overrides: Any
    ) -> ServiceSettings:
        """Defaults, then COVID_CXR_* variables, then `overrides` that are not None."""
        environ = os.environ if environ is None else environ
        hints = typing.get_type_hints(cls)
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = environ.get(ENV_PREFIX + f.name.upper())
            if raw is not None:
                values[f.name] = _parse(raw, hints[f.name], ENV_PREFIX + f.name.upper())
        values.update({k: v for k, v in overrides.items() if v is not None})
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ConfigError(f"unknown service setting(s) {unknown}")
        return cls(**values)

    def to_env(self) -> dict[str, str]:
        """The COVID_CXR_* variables that rebuild these settings in a worker process."""
        env = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            if isinstance(value, tuple):
                value = ",".join(value)
            elif isinstance(value, bool):
                value = "true" if value else "false"
            env[ENV_PREFIX + f.name.upper()] = str(value)
        return env


TRUE_WORDS = {"1", "true", "yes", "on"}
FALSE_WORDS = {"0", "false", "no", "off"}


def _parse(raw: str, tp: Any, where: str) -> Any:
    """One env string as the field's type; an empty string means None for optional fields."""
    args = typing.get_args(tp)
    if type(None) in args:
        if raw.strip() == "":
            return None
        (tp,) = [a for a in args if a is not type(None)]
    try:
        if tp is bool:
            word = raw.strip().lower()
            if word not in TRUE_WORDS | FALSE_WORDS:
                raise ValueError(f"expected one of {sorted(TRUE_WORDS | FALSE_WORDS)}")
            return word in TRUE_WORDS
        if typing.get_origin(tp) is tuple:
            return tuple(part.strip() for part in raw.split(",") if part.strip())
        return tp(raw.strip()) if tp in (int, float) else raw
    except ValueError as exc:
        raise ConfigError(f"environment variable {where}={raw!r}: {exc}") from exc
