"""`covid-cxr audit export|stats`, and the `--audit-db` / `--no-audit` options of predict/serve."""

from __future__ import annotations

import argparse
import json
import sys

from covid_cxr.audit.report import EXPORT_FORMATS

AUDIT_HELP = (
    "where every prediction is recorded: sqlite:///PATH, a file path, or postgresql://... "
    "(default: $COVID_CXR_AUDIT_DB, else $XDG_STATE_HOME/covid-cxr/audit.db, "
    "else ~/.local/state/covid-cxr/audit.db)"
)


def add_audit_options(parser: argparse.ArgumentParser) -> None:
    """`--audit-db URL` and `--no-audit` (the same as `--audit-db off`)."""
    parser.add_argument("--audit-db", metavar="URL", help=AUDIT_HELP)
    parser.add_argument(
        "--no-audit",
        action="store_true",
        help="record nothing in the audit trail (same as --audit-db off)",
    )


def audit_url(args: argparse.Namespace) -> str:
    """The address the options name: "off", the given URL, or the default."""
    from covid_cxr.audit.store import OFF, default_url

    return OFF if args.no_audit else args.audit_db or default_url()


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "audit",
        help="export or summarise the audit trail of predictions",
        description="Every prediction of `covid-cxr predict` and `covid-cxr serve` is recorded "
        "(time, request id, API key id, input sha256, format and size, model, outcome, "
        "probability, threshold, label, latency; never pixels, file names or patient data).",
    )
    commands = parser.add_subparsers(dest="audit_command", required=True, metavar="COMMAND")
    export = commands.add_parser("export", help="write the recorded events as CSV or JSON lines")
    export.add_argument("--audit-db", metavar="URL", help=AUDIT_HELP)
    export.add_argument("--format", choices=EXPORT_FORMATS, default="csv")
    export.add_argument("--since", metavar="ISO-TIME", help="only events at or after this time")
    export.add_argument("--output", metavar="FILE", help="write here (atomically), not stdout")
    export.set_defaults(func=run_export)
    stats = commands.add_parser("stats", help="counts by outcome, model, channel; latency")
    stats.add_argument("--audit-db", metavar="URL", help=AUDIT_HELP)
    stats.add_argument("--since", metavar="ISO-TIME", help="only events at or after this time")
    stats.add_argument("--json", action="store_true", help="print one JSON object")
    stats.set_defaults(func=run_stats)


def run_export(args: argparse.Namespace) -> int:
    from covid_cxr.audit.report import write_events
    from covid_cxr.audit.store import open_store, to_utc
    from covid_cxr.fileio import atomic_open

    since = to_utc(args.since) if args.since else None
    with open_store(args.audit_db, create=False) as store:
        if args.output:
            with atomic_open(args.output, "w", encoding="utf-8", newline="") as stream:
                count = write_events(store.events(since), stream, args.format)
        else:
            count = write_events(store.events(since), sys.stdout, args.format)
    print(f"{count} event(s) exported from {store.shown}", file=sys.stderr)
    return 0


def run_stats(args: argparse.Namespace) -> int:
    from covid_cxr.audit.report import summarise
    from covid_cxr.audit.store import open_store, to_utc

    since = to_utc(args.since) if args.since else None
    with open_store(args.audit_db, create=False) as store:
        stats = summarise(store.events(since))
    if args.json:
        print(json.dumps(stats.as_dict(), indent=2))
    else:
        print(f"audit trail: {store.shown}")
        print("\n".join(stats.lines()))
    return 0
