"""`srvit serve` settings: one object, SRVIT_* variables, flags that override them; no torch in the service."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from service.cli import ENV_ONLY, add_arguments, main, settings_from
from service.settings import Settings


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_every_setting_has_a_flag_and_flags_override_the_environment(monkeypatch):
    monkeypatch.setenv("SRVIT_PORT", "9000")
    monkeypatch.setenv("SRVIT_LATENCY_TARGET_MS", "50")
    monkeypatch.setenv("SRVIT_PROVIDERS", "cpu")
    settings = settings_from(parse("--port", "9100", "--warmup-batch-sizes", "16,1,4", "--default-depth", "auto"))
    assert (settings.port, settings.latency_target_ms, settings.providers) == (9100, 50.0, ("cpu",))
    assert (settings.warmup_batch_sizes, settings.default_depth) == ((1, 4, 16), "auto")
    flags = {a.dest for a in argparse.ArgumentParser()._actions}
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert set(Settings.model_fields) - ENV_ONLY <= {a.dest for a in parser._actions} - flags
    assert {"api_key"} == ENV_ONLY  # a secret, in SRVIT_API_KEY only: never a flag that `ps` would show


def test_defaults_without_flags_or_environment(monkeypatch):
    for name in Settings.model_fields:
        monkeypatch.delenv(f"SRVIT_{name.upper()}", raising=False)
    s = settings_from(parse())
    assert (str(s.repo), s.host, s.port, s.default_depth, s.max_queue_delay_ms) == ("model_repo", "127.0.0.1", 8000,
                                                                                     None, 0.0)  # fmt: skip


def test_bad_setting_exits_2_with_the_reason(capsys):
    assert main(parse("--port", "eighty")) == 2
    assert "port" in capsys.readouterr().err


def test_srvit_cli_wires_serve():
    from cli.main import build_parser

    args = build_parser("serve").parse_args(["serve", "--repo", "elsewhere", "--host", "0.0.0.0"])
    assert (args.repo, args.host) == ("elsewhere", "0.0.0.0")


@pytest.mark.parametrize("value", ["0", "1.5", "-2"])
def test_warmup_sizes_must_be_positive_integers(value):
    with pytest.raises(ValueError):
        Settings(warmup_batch_sizes=value)


def test_service_never_imports_torch_or_srvit():
    """The base install serves without torch; a stray import would break it only there."""
    code = (
        "import pkgutil, importlib, sys, service\n"
        "for m in pkgutil.iter_modules(service.__path__):\n"
        "    if m.name != 'tensorrt_runtime':  # needs the optional tensorrt package\n"
        "        importlib.import_module('service.' + m.name)\n"
        "print(sorted({'torch', 'srvit'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_creating_the_app_loads_nothing(tmp_path):
    """No import-time or construction-time side effects: a missing repository only matters at start-up."""
    from service.app import create_app

    app = create_app(Settings(repo=tmp_path / "does-not-exist"))
    assert app.state.service.state == "starting"
