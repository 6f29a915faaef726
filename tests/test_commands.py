"""The command-line programs' argument types and stop signals (inference_service.commands)."""

import os
import signal

import pytest

from inference_service import cli, convert_official, evaluate, serve, train
from inference_service.commands import interrupts_deferred, stops_as_interrupts
from inference_service.training.datasets import parse_data_spec

COMMANDS = {
    "chatpose demo": lambda device: cli.build_parser().parse_args(["demo", "--device", device]),
    "chatpose-serve": lambda device: serve.build_parser().parse_args(["--device", device]),
    "train": lambda device: train.build_parser().parse_args(
        ["--base", "b", "--out", "o", "--data", "corpus", "c.npz", "--device", device]
    ),
    "evaluate": lambda device: evaluate.build_parser().parse_args(
        ["--checkpoint", "nowhere", "--data", "corpus", "c.npz", "--device", device]
    ),
}


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_refuses_a_mistyped_device_as_it_reads_its_arguments(command, capsys):
    with pytest.raises(SystemExit) as exited:  # before any data or model is read
        COMMANDS[command]("gpu")
    assert exited.value.code == 2
    assert "expected auto, cpu, cuda or cuda:N, got 'gpu'" in capsys.readouterr().err


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_takes_each_device_form(command):
    for device in ("auto", "cpu", "cuda", "cuda:1"):
        assert COMMANDS[command](device).device == device


def test_every_path_argument_expands_a_tilde_the_shell_left(monkeypatch, tmp_path):
    # The shell expands `~` only at a word's start: `--checkpoint=~/model` reaches us as it is.
    monkeypatch.setenv("HOME", str(tmp_path))
    home = tmp_path / "m"
    parsed = {
        "chatpose-serve": serve.build_parser().parse_args(
            ["--checkpoint=~/m", "--curve-secret-key=~/m", "--curve-clients=~/m"]
        ),
        "chatpose pose": cli.build_parser().parse_args(
            ["pose", "x", "--image=~/m", "--out=~/m/a.npz", "--checkpoint=~/m"]
        ),
        "train": train.build_parser().parse_args(
            ["--base=~/m", "--out=~/m", "--data", "corpus", "c.npz"]
        ),
        "chatpose batch": cli.build_parser().parse_args(["batch", "~/m", "--out=~/m/a.npz"]),
        "evaluate": evaluate.build_parser().parse_args(
            ["--checkpoint=~/m", "--data", "corpus", "c.npz", "--out=~/m", "--pairs=~/m"]
        ),
        "convert": convert_official.build_parser().parse_args(["~/m", "~/m", "--vision-tower=~/m"]),
    }
    serve_args, pose_args, train_args, batch_args, evaluate_args, convert_args = parsed.values()
    assert serve_args.checkpoint == serve_args.curve_secret_key == serve_args.curve_clients == home
    assert pose_args.image == pose_args.checkpoint == home and pose_args.out == home / "a.npz"
    assert train_args.base == train_args.out == home
    assert batch_args.file == home and batch_args.out == home / "a.npz"
    assert evaluate_args.checkpoint == evaluate_args.out == evaluate_args.pairs == home
    assert convert_args.source == convert_args.destination == convert_args.vision_tower == home
    # --data's paths, which zsh leaves as they are after `=`
    spec = parse_data_spec(["posescript", "~/m", "poses=~/m", "ids=~/m"])
    assert spec.path == spec.options["poses"] == spec.options["ids"] == str(home)


def test_sigterm_stops_as_ctrl_c_and_its_handler_is_given_back():
    outside = []  # SIGTERM's handler outside the block (the default would end pytest)
    previous = signal.signal(signal.SIGTERM, lambda number, frame: outside.append(number))
    try:
        with pytest.raises(KeyboardInterrupt), stops_as_interrupts():
            os.kill(os.getpid(), signal.SIGTERM)
        assert outside == []
        os.kill(os.getpid(), signal.SIGTERM)  # handed back after the block
        assert outside == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_block_that_ends_may_hand_its_stops_to_the_next_handler_with_no_default_between():
    # chatpose-serve: the stop that ends a load handed SIGTERM back to its default, which
    # killed the service without a log line if one came before its own handler was set.
    outside, after = [], []
    previous = signal.signal(signal.SIGTERM, lambda number, frame: outside.append(number))
    try:
        with stops_as_interrupts(after=lambda number, frame: after.append(number)):
            pass
        os.kill(os.getpid(), signal.SIGTERM)
        assert after == [signal.SIGTERM] and outside == []
        signal.signal(signal.SIGTERM, lambda number, frame: outside.append(number))
        with pytest.raises(ValueError), stops_as_interrupts(after=after.append):
            raise ValueError("the load failed")  # then the handler before it is given back
        os.kill(os.getpid(), signal.SIGTERM)
        assert outside == [signal.SIGTERM] and after == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_stop_during_a_deferred_block_comes_after_it(stops_by_default):
    finished = []
    with pytest.raises(KeyboardInterrupt), interrupts_deferred():
        os.kill(os.getpid(), signal.SIGINT)
        finished.append("the write")
    assert finished == ["the write"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_windows_ctrl_break_stops_as_ctrl_c(monkeypatch):
    # Windows has no SIGHUP, and nothing sends it SIGTERM: Ctrl+Break sends SIGBREAK, whose
    # default ended `chatpose batch` without writing its answers.
    # Here a spare signal stands in for SIGBREAK, which Linux has not.
    monkeypatch.setattr(signal, "SIGBREAK", signal.SIGUSR1, raising=False)
    outside = []  # its handler outside the blocks (the default would end pytest)
    previous = signal.signal(signal.SIGUSR1, lambda number, frame: outside.append(number))
    try:
        with pytest.raises(KeyboardInterrupt), stops_as_interrupts():
            os.kill(os.getpid(), signal.SIGUSR1)
        finished = []
        with pytest.raises(KeyboardInterrupt), interrupts_deferred():
            os.kill(os.getpid(), signal.SIGUSR1)
            finished.append("the write")
        assert finished == ["the write"] and outside == []
    finally:
        signal.signal(signal.SIGUSR1, previous)
