"""Every knob of the web service in one typed place, read from COVID_CXR_* and the CLI.

Each field carries its help text; `covid-cxr serve` builds its flags from these fields, so a
setting is declared once. The CLI writes the resolved settings back to the environment
(`to_env`) so that each uvicorn worker process, which imports the app by name, builds the very
same settings (`from_env`).
"""

from __future__ import annotations

import dataclasses
import os
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from covid_cxr.errors import ConfigError

ENV_PREFIX = "COVID_CXR_"
MIB = 1024 * 1024
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
SECRETS = ("api_key", "audit_db")  # a database URL may hold a password


def _opt(default: Any, help: str, *, flag: str | None = None, **argparse: Any) -> Any:
    """A settings field with its `serve` help; `flag` renames the option (e.g. a repeatable
    one); other keywords (metavar, choices) go to argparse as they are."""
    return field(default=default, metadata={"help": help, "flag": flag, **argparse})


@dataclass(frozen=True)
class ServiceSettings:
    """How `covid-cxr serve` runs; each field is also env var COVID_CXR_<FIELD NAME>.

    inference_workers run predictions at once; a request is admitted while its expected wait
    (queue x measured service time) stays under max_queue_wait_s and at most queue_size wait;
    clients that send `Prefer: wait=N` are held up to N s (max_client_wait_s) for a place
    instead of an immediate 503.
    """

    host: str = _opt("127.0.0.1", "address to listen on (default 127.0.0.1: this machine only)")
    port: int = _opt(8000, "port (default 8000)")
    workers: int = _opt(1, "server processes, each with its own model (default 1)")
    model: str | None = _opt(
        None, "ONNX file or checkpoint (default: the shipped model)", metavar="PATH"
    )
    operating_point: str | None = _opt(
        None, "named threshold of the model (default: the model's own)"
    )
    gate: bool = _opt(
        True,
        "refuse images that are not frontal chest radiographs (default on; --no-gate or "
        "COVID_CXR_GATE=off bypasses the input gate, for research only)",
    )
    threads: int | None = _opt(1, "runtime threads per prediction (default 1)")
    inference_workers: int = _opt(2, "predictions at once per process (default 2)")
    queue_size: int = _opt(64, "most predictions waiting before 503 (default 64)")
    max_queue_wait_s: float = _opt(
        2.0, "admit a request while its expected wait is below this (default 2 s)"
    )
    max_client_wait_s: float = _opt(
        10.0, "longest `Prefer: wait=N` a client may ask for instead of a 503 (default 10 s)"
    )
    max_upload_mb: float = _opt(20.0, "largest file accepted (default 20)")
    max_batch_files: int = _opt(16, "most files in one batch request (default 16)")
    max_batch_mb: float = _opt(100.0, "largest batch request (default 100)")
    # 4096 x 4096: more than a chest radiograph needs (the model sees 224 px; most detectors
    # give 3,000 x 3,000, 100 um plates 3,500 x 4,300), and a request costs ~10 bytes a pixel
    # at its peak (float32 pixels plus preprocessing copies), so two inference workers at the
    # limit stay near 450 MiB, under 600 MiB (tests/test_hostile_inputs.py measures it).
    max_pixels: int = _opt(4096 * 4096, "largest image in pixels (default 4096 x 4096)")
    upload_timeout_s: float = _opt(
        60.0, "longest an upload may take, however fast it arrives (default 60 s)"
    )
    min_upload_kbps: float = _opt(
        64.0, "an upload slower than this many KiB/s after its first 2 s gets 408 (default 64)"
    )
    image_max_side: int = _opt(1024, "longest side of returned heat-map PNGs (default 1024)")
    api_key: str | None = _opt(
        None,
        "require this X-API-Key for /api/* (prefer COVID_CXR_API_KEY: the command line "
        "is visible to other users of the machine)",
        metavar="KEY",
    )
    allowed_hosts: tuple[str, ...] = _opt(
        (),
        "accept requests whose Host header names this (repeatable; default: localhost "
        "names and the --host address; * turns the check off)",
        flag="--allowed-host",
        metavar="NAME",
    )
    cors_origins: tuple[str, ...] = _opt(
        (),
        "allow browser calls from this origin (repeatable; default: CORS off)",
        flag="--cors-origin",
        metavar="ORIGIN",
    )
    max_connections: int = _opt(
        256,
        "most open connections per process; a new one beyond closes the longest-idle, or gets "
        "503 when none is idle (default 256)",
    )
    keep_alive_s: float = _opt(5.0, "close a keep-alive connection idle this long (default 5 s)")
    max_header_kb: int = _opt(64, "largest request head, in KiB (default 64)")
    ssl_certfile: str | None = _opt(None, "serve HTTPS with this PEM certificate", metavar="PATH")
    ssl_keyfile: str | None = _opt(None, "private key of --ssl-certfile", metavar="PATH")
    audit_db: str | None = _opt(
        None,
        "record every prediction here: sqlite:///PATH, postgresql://..., or off (default: "
        "$XDG_STATE_HOME/covid-cxr/audit.db, else ~/.local/state/covid-cxr/audit.db; with a "
        "password, prefer COVID_CXR_AUDIT_DB)",
        metavar="URL",
    )
    access_log: bool = _opt(True, "log each request line")
    log_level: str = _opt("info", "log level (default info)", choices=LOG_LEVELS)

    def __post_init__(self) -> None:
        checks = {
            "port": 0 <= self.port <= 65535,
            "workers": self.workers >= 1,
            "threads": self.threads is None or self.threads >= 1,
            "inference_workers": self.inference_workers >= 1,
            "queue_size": self.queue_size >= 0,
            "max_queue_wait_s": self.max_queue_wait_s >= 0,
            "max_client_wait_s": self.max_client_wait_s >= 0,
            "max_upload_mb": self.max_upload_mb > 0,
            "max_batch_files": self.max_batch_files >= 1,
            "max_batch_mb": self.max_batch_mb >= self.max_upload_mb,
            "max_pixels": self.max_pixels >= 64 * 64,
            "upload_timeout_s": self.upload_timeout_s > 0,
            "min_upload_kbps": self.min_upload_kbps >= 0,
            "image_max_side": 64 <= self.image_max_side <= 8192,
            "api_key": self.api_key is None or len(self.api_key) >= 8,
            "max_connections": self.max_connections >= 8,
            "keep_alive_s": self.keep_alive_s > 0,
            "max_header_kb": 4 <= self.max_header_kb <= 1024,
            "ssl_keyfile": (self.ssl_certfile is None) == (self.ssl_keyfile is None),
            "log_level": self.log_level in LOG_LEVELS,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ConfigError(
                f"invalid service setting(s) {bad}: "
                + ", ".join(f"{name}={self.shown(name)}" for name in bad)
                + " (max_batch_mb must be at least max_upload_mb; an API key has >= 8 "
                "characters; ssl_certfile and ssl_keyfile go together)"
            )

    def shown(self, name: str) -> str:
        """A field's value for messages: secrets are never echoed, not even a wrong one."""
        value = getattr(self, name)
        if name in SECRETS and value is not None:
            return f"<hidden, {len(value)} characters>"
        return repr(value)

    def __repr__(self) -> str:
        fields = ", ".join(f"{f.name}={self.shown(f.name)}" for f in dataclasses.fields(self))
        return f"ServiceSettings({fields})"

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


def field_type(tp: Any) -> tuple[Any, bool]:
    """(the type without None, whether None is allowed) of a settings field's annotation."""
    args = typing.get_args(tp)
    if type(None) in args:
        (inner,) = [a for a in args if a is not type(None)]
        return inner, True
    return tp, False


def _parse(raw: str, tp: Any, where: str) -> Any:
    """One env string as the field's type; an empty string means None for optional fields."""
    tp, optional = field_type(tp)
    if optional and raw.strip() == "":
        return None
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
