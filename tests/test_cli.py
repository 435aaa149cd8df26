"""The `covid-cxr` entry point: help, version, one-line errors, no heavy imports for help."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
import types
from importlib.metadata import version
from pathlib import Path

import pytest

import covid_cxr
from covid_cxr import cli
from covid_cxr.errors import ConfigError, CorruptImageError, CovidCxrError, ModelError

# Libraries that take long to import; `covid-cxr --help` must not pay for them.
HEAVY = ("torch", "onnx", "onnxruntime", "uvicorn", "matplotlib", "sklearn")


def console_script() -> list[str]:
    """The installed `covid-cxr` script next to this interpreter, else `python -m covid_cxr.cli`."""
    script = Path(sys.executable).with_name("covid-cxr")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "covid_cxr.cli"]


def run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=120, env=os.environ)


def test_help_shows_every_stage_and_the_research_notice() -> None:
    result = run(sys.executable, "-m", "covid_cxr.cli", "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: covid-cxr")
    assert covid_cxr.RESEARCH_NOTICE in " ".join(result.stdout.split())
    for command in ("data", "train", "evaluate", "serve"):
        assert command in result.stdout


def test_version_of_the_installed_script() -> None:
    result = run(*console_script(), "--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"covid-cxr {covid_cxr.__version__}"
    assert covid_cxr.__version__ == version("covid-cxr")  # package metadata agrees


# Imports each stage the way build_parser does, noting which heavy libraries each one pulls
# in, then asks every (sub-)command for its help.
PROBE = textwrap.dedent(
    """
    import argparse, contextlib, importlib, io, json, sys
    import covid_cxr.cli as c
    heavy = set(sys.argv[1:])
    pulled = {}
    for stage in c.STAGES:
        importlib.import_module(stage)
        pulled[stage] = sorted(m for m in heavy if m in sys.modules)
    parser = c.build_parser()

    def commands(p, path):
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield [*path, name]
                    yield from commands(sub, [*path, name])

    helps = {}
    for path in commands(parser, []):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            try:
                parser.parse_args([*path, "--help"])
                code = None
            except SystemExit as exc:
                code = exc.code
        helps[" ".join(path)] = [code, out.getvalue()]
    loaded = sorted(m for m in heavy if m in sys.modules)
    print(json.dumps({"pulled": pulled, "helps": helps, "loaded": loaded}))
    """
)


@pytest.fixture(scope="module")
def probe() -> dict:
    result = run(sys.executable, "-c", PROBE, *HEAVY)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_every_sub_command_has_working_help(probe: dict) -> None:
    helps = probe["helps"]
    assert {"data", "train", "evaluate", "serve"} <= set(helps)
    for command, (code, text) in helps.items():
        assert code == 0, f"covid-cxr {command} --help exited with {code}"
        assert text.startswith(f"usage: covid-cxr {command}"), text[:200]


def test_help_imports_no_heavy_library(probe: dict) -> None:
    culprits = {stage: mods for stage, mods in probe["pulled"].items() if mods}
    assert probe["loaded"] == [], f"heavy imports at module level (first seen after): {culprits}"


@pytest.fixture
def stage(monkeypatch: pytest.MonkeyPatch) -> types.SimpleNamespace:
    """A fake stage `covid-cxr boom`, whose handler does whatever the test sets."""
    state = types.SimpleNamespace(handler=lambda args: 0)
    module = types.ModuleType("fake_stage_cli")

    def register(subparsers: argparse._SubParsersAction) -> None:
        parser = subparsers.add_parser("boom", help="test stage")
        parser.set_defaults(func=lambda args: state.handler(args))

    module.register = register  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fake_stage_cli", module)
    monkeypatch.setattr(cli, "STAGES", (*cli.STAGES, "fake_stage_cli"))
    return state


@pytest.mark.parametrize(
    "error",
    [
        CovidCxrError("something went wrong"),
        ConfigError("configs/train/x.toml: unknown key(s) ['ephocs']"),
        ModelError("runs/x/model.pt: model checkpoint not found"),
        CorruptImageError("scan.png", "truncated PNG", "re-export the image"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_deliberate_errors_print_one_line_and_exit_2(
    stage: types.SimpleNamespace, capsys: pytest.CaptureFixture[str], error: CovidCxrError
) -> None:
    def handler(args: argparse.Namespace) -> int:
        raise error

    stage.handler = handler
    assert cli.main(["boom"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == f"covid-cxr boom: error: {error}\n"


def test_handler_exit_code_is_passed_through(
    stage: types.SimpleNamespace, capsys: pytest.CaptureFixture[str]
) -> None:
    stage.handler = lambda args: 3
    assert cli.main(["boom"]) == 3
    stage.handler = lambda args: None
    assert cli.main(["boom"]) == 0
    assert capsys.readouterr().err == ""


def test_interrupt_exits_130_without_traceback(
    stage: types.SimpleNamespace, capsys: pytest.CaptureFixture[str]
) -> None:
    def handler(args: argparse.Namespace) -> int:
        raise KeyboardInterrupt

    stage.handler = handler
    assert cli.main(["boom"]) == 130
    assert capsys.readouterr().err == "interrupted\n"


def test_missing_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        cli.main([])
    assert caught.value.code == 2
    assert "usage: covid-cxr" in capsys.readouterr().err


def test_error_in_a_real_process_has_no_traceback() -> None:
    code = textwrap.dedent(
        """
        import sys, types
        import covid_cxr.cli as c
        from covid_cxr.errors import ConfigError

        def fail(args):
            raise ConfigError("recipe.toml: missing required key(s) ['name']")

        stage = types.ModuleType("fake_stage_cli")
        stage.register = lambda sub: sub.add_parser("boom").set_defaults(func=fail)
        sys.modules["fake_stage_cli"] = stage
        c.STAGES = (*c.STAGES, "fake_stage_cli")
        sys.exit(c.main(["boom"]))
        """
    )
    result = run(sys.executable, "-c", code)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == "covid-cxr boom: error: recipe.toml: missing required key(s) ['name']\n"
