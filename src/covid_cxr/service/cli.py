"""`covid-cxr serve`: the web page and REST API under uvicorn, with the shipped model."""

from __future__ import annotations

import argparse
import os
import sys

from covid_cxr import RESEARCH_NOTICE

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
    add = parser.add_argument
    add("--host", help="address to listen on (default 127.0.0.1: this machine only)")
    add("--port", type=int, help="port (default 8000)")
    add("--workers", type=int, help="server processes, each with its own model (default 1)")
    add("--model", help="ONNX file or checkpoint (default: the shipped model)")
    add("--operating-point", help="named threshold of the model (default: the model's own)")
    add("--threads", type=int, help="runtime threads per prediction (default 1)")
    add("--inference-workers", type=int, help="predictions at once per process (default 2)")
    add("--queue-size", type=int, help="predictions that may wait before 503 (default 32)")
    add("--max-upload-mb", type=float, help="largest file accepted (default 20)")
    add("--max-batch-files", type=int, help="most files in one batch request (default 16)")
    add("--max-batch-mb", type=float, help="largest batch request (default 100)")
    add("--max-pixels", type=int, help="largest image in pixels (default 4096 x 4096)")
    add(
        "--api-key",
        help="require this X-API-Key for /api/* (prefer COVID_CXR_API_KEY: the command line "
        "is visible to other users of the machine)",
    )
    add(
        "--cors-origin",
        action="append",
        dest="cors_origins",
        metavar="ORIGIN",
        help="allow browser calls from this origin (repeatable; default: CORS off)",
    )
    add("--access-log", action=argparse.BooleanOptionalAction, help="log each request line")
    add("--log-level", choices=["critical", "error", "warning", "info", "debug"])
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from covid_cxr.inference.predictor import resolve_model_path
    from covid_cxr.service.settings import ServiceSettings

    overrides = {
        name: getattr(args, name)
        for name in (
            "host",
            "port",
            "workers",
            "model",
            "operating_point",
            "threads",
            "inference_workers",
            "queue_size",
            "max_upload_mb",
            "max_batch_files",
            "max_batch_mb",
            "max_pixels",
            "api_key",
            "access_log",
            "log_level",
        )
    }
    if args.cors_origins:
        overrides["cors_origins"] = tuple(args.cors_origins)
    settings = ServiceSettings.from_env(**overrides)
    # Fail here, with the reason, rather than in a worker process after start-up.
    model = resolve_model_path(settings.model)
    if settings.host not in LOOPBACK and settings.api_key is None:
        print(
            f"warning: listening on {settings.host} without an API key; anyone who can reach "
            "this address can use the API (set COVID_CXR_API_KEY)",
            file=sys.stderr,
        )
    # Worker processes import the app by name and rebuild these settings from the environment.
    os.environ.update(settings.to_env())
    print(
        f"covid-cxr: serving {model.name} on http://{settings.host}:{settings.port}/ "
        f"(API docs at /docs). {RESEARCH_NOTICE}",
        file=sys.stderr,
    )
    uvicorn.run(
        "covid_cxr.service.app:app_from_env",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        log_level=settings.log_level,
        access_log=settings.access_log,
        server_header=False,
        timeout_keep_alive=5,
        timeout_graceful_shutdown=10,
    )
    return 0
