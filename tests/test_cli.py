"""The console scripts install; usage errors exit with argparse's code."""

import io
import subprocess
import sys
from pathlib import Path

import pytest

from inference_service import cli, commands

SCRIPTS = Path(sys.executable).parent


def test_usage_errors_exit_with_argparse_code(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["batch", "shots.txt"])
    assert info.value.code == cli.EXIT_USAGE
    assert "the following arguments are required: --out" in capsys.readouterr().err
    assert cli.main([]) == cli.EXIT_USAGE  # a first try gets the help, commands and exit codes
    assert "exit codes:" in capsys.readouterr().err


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


CLIENT_ONLY = """
import sys
for package in {missing!r}:  # as on a `pip install .` machine
    sys.modules[package] = None
from inference_service import cli, entry_points
command = {argv!r}
if command[:1] == ["train"]:  # python -m inference_service.train
    from inference_service import train
    sys.exit(train.main(command[1:]))
sys.exit(cli.main(command) if command else entry_points.chatpose_serve())
"""
CLIENT_PACKAGES = ("torch", "PIL", "transformers")


@pytest.mark.parametrize(
    ("argv", "missing"),
    [
        ([], CLIENT_PACKAGES),
        ([], ("torch", "transformers")),  # imported by chatpose-serve's main(), not its module
        (["pose", "wave", "--local"], CLIENT_PACKAGES),
        (["demo", "--out", "OUT"], CLIENT_PACKAGES),
        (["train", "--base", "OUT", "--out", "OUT", "--data", "corpus", "OUT"], CLIENT_PACKAGES),
    ],
    ids=["chatpose-serve", "chatpose-serve with pillow", "pose --local", "demo", "train"],
)
def test_a_client_only_install_names_the_missing_package_not_a_traceback(argv, missing, tmp_path):
    argv = [str(tmp_path / "out") if word == "OUT" else word for word in argv]
    ran = subprocess.run(
        [sys.executable, "-c", CLIENT_ONLY.format(argv=argv, missing=missing)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ran.returncode == cli.EXIT_USAGE, ran.stderr
    assert "Traceback" not in ran.stderr
    assert "needs the '" in ran.stderr and "pip install '.[service]'" in ran.stderr
    assert "'PIL'" not in ran.stderr  # the package, not the module: pillow


def test_redirected_output_is_utf8_whatever_the_system_code_page():
    # Windows gives a redirected stdout its code page: no degree sign in some, no UTF-8 JSON.
    stdout = io.TextIOWrapper(io.BytesIO(), encoding="cp1252")
    commands.utf8_output(stdout)
    stdout.write("wrist 12.0° 😀")
    stdout.flush()
    assert stdout.buffer.getvalue().decode("utf-8") == "wrist 12.0° 😀"
