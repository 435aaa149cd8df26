"""`covid-cxr pacs process|watch`: the round trip with a PACS over DICOMweb."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from covid_cxr import RESEARCH_NOTICE

if TYPE_CHECKING:
    from covid_cxr.audit.events import Recorder
    from covid_cxr.inference.predictor import Predictor
    from covid_cxr.pacs.dicomweb import DicomWebClient
    from covid_cxr.pacs.roundtrip import StudyResult

PASSWORD_ENV = "COVID_CXR_PACS_PASSWORD"
TOKEN_ENV = "COVID_CXR_PACS_TOKEN"
DESCRIPTION = f"""\
Find studies on a DICOMweb server (QIDO-RS), retrieve their CR/DX radiographs into memory
(WADO-RS), predict each, and store a Structured Report and a Grad-CAM Secondary Capture back
into the study (STOW-RS). Authentication: --user with the password in ${PASSWORD_ENV}, or a
bearer token in ${TOKEN_ENV} (never on the command line, where other users can see it).
{RESEARCH_NOTICE}"""


def register(subparsers: argparse._SubParsersAction) -> None:
    from covid_cxr.audit.cli import add_audit_options

    parser = subparsers.add_parser(
        "pacs",
        help="predict studies on a PACS and store the results back (DICOMweb)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    process = actions.add_parser("process", help="process the given studies once")
    process.add_argument("--study", action="append", required=True, metavar="UID")
    watch = actions.add_parser("watch", help="process every new study exactly once, forever")
    watch.add_argument(
        "--state",
        type=Path,
        required=True,
        help="SQLite file remembering the studies done (kept across restarts)",
    )
    watch.add_argument("--interval", type=float, default=10.0, help="seconds between polls")
    watch.add_argument("--once", action="store_true", help="process what is pending, then exit")
    for sub in (process, watch):
        sub.add_argument(
            "--url", required=True, help="DICOMweb root, e.g. http://pacs:8042/dicom-web"
        )
        sub.add_argument("--user", help=f"HTTP basic user (password in ${PASSWORD_ENV})")
        sub.add_argument("--model", help="ONNX file or checkpoint (default: the shipped model)")
        sub.add_argument("--operating-point", help="a named threshold of the model")
        add_audit_options(sub)
        sub.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from covid_cxr.audit.cli import audit_url
    from covid_cxr.audit.store import recorder_for
    from covid_cxr.inference.predictor import Predictor
    from covid_cxr.pacs.dicomweb import Auth, Backoff, DicomWebClient

    auth = Auth(args.user, os.environ.get(PASSWORD_ENV), os.environ.get(TOKEN_ENV))
    predictor = Predictor(args.model, operating_point=args.operating_point)
    # The watcher backs off itself between polls; one request waits less for the PACS.
    backoff = Backoff(patience=5.0) if args.action == "watch" else Backoff()
    print(f"{RESEARCH_NOTICE}\nmodel: {predictor!r}", file=sys.stderr)
    recorder = recorder_for(audit_url(args))  # every prediction is recorded before it is stored
    try:
        with DicomWebClient(args.url, auth, backoff=backoff) as client:
            if args.action == "process":
                return _process(client, predictor, args.study, recorder)
            return _watch(client, predictor, args, recorder)
    finally:
        recorder.close()


def _report(result: StudyResult) -> None:
    if result.skipped:
        print(f"{result.study_uid}: skipped: {result.skipped}", file=sys.stderr)
        return
    for item in result.instances:
        verdict = (
            f"{item.label} (p={item.probability:.3f})"
            if item.outcome == "predicted"
            else f"{item.outcome}: {item.reason}"
        )
        print(f"{result.study_uid} {item.sop_instance_uid}: {verdict}", file=sys.stderr)
    print(
        f"{result.study_uid}: {result.predicted} predicted, {result.stored} result objects "
        f"stored in {result.seconds:.1f} s",
        file=sys.stderr,
    )


def _process(
    client: DicomWebClient, predictor: Predictor, studies: list[str], recorder: Recorder
) -> int:
    from covid_cxr.pacs.roundtrip import process_study

    failed = 0
    for study in studies:
        result = process_study(client, predictor, study, recorder)
        _report(result)
        failed += sum(item.outcome != "predicted" for item in result.instances)
    return 1 if failed else 0


def _watch(
    client: DicomWebClient, predictor: Predictor, args: argparse.Namespace, recorder: Recorder
) -> int:
    from covid_cxr.pacs.watch import ProcessedStudies, run_once, watch

    memory = ProcessedStudies(args.state)
    try:
        if args.once:
            done = run_once(client, predictor, memory, _report, recorder)
            print(f"{done} new study(ies) processed; {memory.count()} done in all", file=sys.stderr)
            return 0
        print(f"watching {args.url} every {args.interval:g} s (Ctrl-C stops)", file=sys.stderr)
        watch(client, predictor, memory, _report, interval=args.interval, recorder=recorder)
        return 0
    finally:
        memory.close()
