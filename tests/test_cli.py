"""The console scripts install; usage errors exit with argparse's code."""

import subprocess
import sys
from pathlib import Path

import pytest

from inference_service import cli

SCRIPTS = Path(sys.executable).parent


def test_usage_errors_exit_with_argparse_code(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["pose"])
    assert info.value.code == cli.EXIT_USAGE
    assert "the following arguments are required: text" in capsys.readouterr().err


def test_console_scripts_are_installed():
    chatpose = subprocess.run(
        [str(SCRIPTS / "chatpose"), "--help"], capture_output=True, text=True, timeout=60
    )
    assert chatpose.returncode == 0
    assert all(command in chatpose.stdout for command in ("pose", "batch", "status", "demo"))
    assert "exit codes:" in chatpose.stdout

    serve_run = subprocess.run(
        [str(SCRIPTS / "chatpose-serve"), "--help"], capture_output=True, text=True, timeout=60
    )
    assert serve_run.returncode == 0
    assert "--checkpoint" in serve_run.stdout
