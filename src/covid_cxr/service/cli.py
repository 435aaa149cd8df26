"""`covid-cxr serve`: the web page and REST API under uvicorn, with the shipped model.

The flags are made from `ServiceSettings`' fields (name, type, help), so a new setting is a
new flag and a new COVID_CXR_* variable at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing
from typing import Any

from covid_cxr import RESEARCH_NOTICE
from covid_cxr.service.settings import ServiceSettings, field_type

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve the web page and REST API",
        description=(
            "Serve the web page (/) and the REST API (/api/v1, docs at /docs). Every option "
            f"can also be set as COVID_CXR_<OPTION> (e.g. COVID_CXR_API_KEY). {RESEARCH_NOTICE}"
        ),
    )
    hints = typing.get_type_hints(ServiceSettings)
    for setting in dataclasses.fields(ServiceSettings):
        _add_flag(parser, setting, hints[setting.name])
    parser.set_defaults(func=run)


def _add_flag(parser: argparse.ArgumentParser, setting: dataclasses.Field, hint: Any) -> None:
    """One option for one settings field; defaults stay None so the environment can fill in."""
    meta = dict(setting.metadata)
    flag = meta.pop("flag") or "--" + setting.name.replace("_", "-")
    options: dict[str, Any] = {"help": meta.pop("help"), "dest": setting.name}
    options.update({key: value for key, value in meta.items() if value is not None})
    tp, _ = field_type(hint)
    if tp is bool:
        options["action"] = argparse.BooleanOptionalAction
    elif typing.get_origin(tp) is tuple:
        options["action"] = "append"
    elif tp in (int, float):
        options["type"] = tp
        options.setdefault("metavar", "SECONDS" if setting.name.endswith("_s") else "N")
    parser.add_argument(flag, **options)


def settings_from_args(args: argparse.Namespace) -> ServiceSettings:
    """Environment first, then the flags that were given."""
    overrides = {}
    for setting in dataclasses.fields(ServiceSettings):
        value = getattr(args, setting.name, None)
        overrides[setting.name] = tuple(value) if isinstance(value, list) else value
    return ServiceSettings.from_env(**overrides)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from covid_cxr.audit.store import describe, recorder_for
    from covid_cxr.inference.predictor import resolve_model_path
    from covid_cxr.service.connections import uvicorn_options

    settings = settings_from_args(args)
    # Fail here, with the reason, rather than in a worker process after start-up.
    model = resolve_model_path(settings.model)
    recorder_for(settings.audit_db).close()  # the audit trail must be writable too
    if settings.host not in LOOPBACK and settings.api_key is None:
        print(
            f"warning: listening on {settings.host} without an API key; anyone who can reach "
            "this address can use the API (set COVID_CXR_API_KEY)",
            file=sys.stderr,
        )
    # Worker processes import the app by name and rebuild these settings from the environment.
    os.environ.update(settings.to_env())
    scheme = "https" if settings.ssl_certfile else "http"
    print(
        f"covid-cxr: serving {model.name} on {scheme}://{settings.host}:{settings.port}/ "
        f"(API docs at /docs; audit trail: {describe(settings.audit_db)}). {RESEARCH_NOTICE}",
        file=sys.stderr,
    )
    uvicorn.run("covid_cxr.service.app:app_from_env", factory=True, **uvicorn_options(settings))
    return 0
