"""The tiny real model behind the scheduler and server, and the chatpose-serve process."""

from __future__ import annotations

import dataclasses
import gc
import io
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import zmq
from PIL import Image

from inference_service import serve
from inference_service.backend import ModelBackend, paired_turns
from inference_service.errors import BadImageError, UnsupportedInputError
from inference_service.keys import make_keys
from inference_service.modeling_chatpose import ChatReply, PosePrompt
from inference_service.scheduler import WorkItem
from inference_service.server import Server
from shared_protocol.client import Client
from shared_protocol.protocol import (
    BatchDoneReply,
    BatchItemReply,
    BatchRequest,
    ErrorCode,
    PoseReply,
    PoseRequest,
    StatusReply,
    StatusRequest,
    Turn,
)
from tests.conftest import stop_signals_by_default

TIMEOUT_S = 30.0


def png_bytes(seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (40, 48, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(autouse=True)
def restore_logging():
    """serve.main configures the root logger; put it back for the tests that follow."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_paired_turns():
    wire = (Turn("user", "sit down"), Turn("assistant", "Sure, it is <POSE>."))
    [pair] = paired_turns(wire)
    assert (pair.user, pair.assistant) == ("sit down", "Sure, it is <POSE>.")
    assert paired_turns(()) == ()
    with pytest.raises(UnsupportedInputError, match="odd number of turns"):
        paired_turns(wire[:1])
    with pytest.raises(UnsupportedInputError, match=r"history\[0\], history\[1\]"):
        paired_turns(wire[::-1])


@pytest.fixture(scope="module")
def backend(tiny_model) -> ModelBackend:
    return ModelBackend(tiny_model, "tiny", max_new_tokens=8)


def test_the_service_s_backend_refuses_a_picture_of_one_flat_colour(tiny_checkpoint):
    blank = io.BytesIO()
    Image.new("RGBA", (40, 30), (0, 0, 0, 0)).save(blank, format="PNG")  # a cut-out, no alpha
    served = ModelBackend.from_checkpoint(tiny_checkpoint, device="cpu")
    with pytest.raises(BadImageError, match="shows one flat colour"):
        served.answer_poses([WorkItem("", images=(blank.getvalue(),))])


def test_backend_answers_are_the_models_poses(backend, tiny_model, monkeypatch):
    items = [WorkItem("raise both arms"), WorkItem("", images=(png_bytes(),)), WorkItem("x")]
    answers = backend.answer_poses(items)
    direct = tiny_model.predict_poses([PosePrompt(i.prompt or None, i.images) for i in items])
    for answer, item, pose in zip(answers, items, direct, strict=True):
        [got] = answer.poses
        np.testing.assert_allclose(got.axis_angle, pose, atol=1e-6)
        assert got.label == (item.prompt or None)
    assert answers[0].text == "Sure, it is <POSE>."
    assert answers[1].text == "Sure, the SMPL pose of this person is <POSE>."
    # A checkpoint in the release's wording is asked, and answers, in it.
    released = dataclasses.replace(tiny_model.config, prompt_wording="release")
    monkeypatch.setattr(tiny_model, "config", released)
    [in_release_words] = backend.answer_poses([WorkItem("", images=(png_bytes(),))])
    assert in_release_words.text == "Sure, it is <POSE>."
    assert not np.allclose(in_release_words.poses[0].axis_angle, answers[1].poses[0].axis_angle)
    assert backend.info.model == "tiny" and backend.info.device == "cpu"
    assert ModelBackend(tiny_model, "caf\udce9").info.model == "caf\\udce9"  # a Latin-1 name
    assert backend.info.dtype == "float32" and backend.info.max_images == 1


def test_a_chat_answer_counts_the_history_left_out_in_turns(backend, tiny_model, monkeypatch):
    reply = ChatReply("Sure.", [], exchanges_left_out=3)  # the model counts exchanges
    monkeypatch.setattr(tiny_model, "chat", lambda *args, **kwargs: reply)
    history = (Turn("user", "sit"), Turn("assistant", "ok")) * 4
    answer = backend.answer_chat(WorkItem("now stand", history=history, mode="chat"))
    assert answer.history_left_out == 6  # the protocol, turns


@pytest.fixture(scope="module")
def served(backend):
    server = Server(backend, backend.info, "tcp://127.0.0.1:*", max_batch=8, max_wait_ms=20)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.stop()
    thread.join(TIMEOUT_S)


def test_text_image_and_chat_requests_over_zeromq(served, backend):
    with Client(served.address, context=zmq.Context.instance()) as client:
        status = client.request(StatusRequest(client.new_id()), TIMEOUT_S)
        assert isinstance(status, StatusReply) and status.model == "tiny"

        text = client.request(PoseRequest(client.new_id(), "kneel on one knee"), TIMEOUT_S)
        assert isinstance(text, PoseReply) and len(text.poses) == 1
        assert np.isfinite(text.poses[0].axis_angle).all()

        image = client.request(PoseRequest(client.new_id(), "", images=(png_bytes(),)), TIMEOUT_S)
        assert isinstance(image, PoseReply)
        expected = backend.answer_poses([WorkItem("", images=(png_bytes(),))])[0].poses
        np.testing.assert_allclose(image.poses[0].axis_angle, expected[0].axis_angle, atol=1e-5)

        history = (Turn("user", "sit"), Turn("assistant", "Sure, it is <POSE>."))
        chat = PoseRequest(client.new_id(), "now stand up", history=history, mode="chat")
        reply = client.request(chat, TIMEOUT_S)
        assert isinstance(reply, PoseReply) and isinstance(reply.text, str)

        broken = PoseRequest(client.new_id(), "", images=(b"\x89PNG\r\n\x1a\n broken",))
        assert client.request(broken, TIMEOUT_S).code == ErrorCode.BAD_IMAGE


def test_a_batch_over_zeromq_equals_single_requests(served):
    prompts = [f"pose {i}: lift the left leg" + "!" * i for i in range(6)]
    with Client(served.address, context=zmq.Context.instance()) as client:
        singles = [
            client.request(PoseRequest(client.new_id(), p), TIMEOUT_S).poses[0] for p in prompts
        ]
        replies = list(client.stream(BatchRequest(client.new_id(), prompts), TIMEOUT_S))
    items = sorted((r for r in replies if isinstance(r, BatchItemReply)), key=lambda r: r.index)
    assert [r.index for r in items] == list(range(6))
    assert isinstance(replies[-1], BatchDoneReply) and replies[-1].completed == 6
    for item, single in zip(items, singles, strict=True):
        np.testing.assert_allclose(item.poses[0].axis_angle, single.axis_angle, atol=1e-5)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("stop", ["SIGTERM", "SIGHUP", "stdin closed"])
def test_chatpose_serve_process_serves_and_stops_on_a_signal_or_when_its_stdin_closes(
    tiny_checkpoint, stop
):
    # The add-on starts it with --stop-with-stdin and holds the pipe, which the system closes
    # however Blender ends: the service does not outlive a crashed Blender on any platform.
    address = f"tcp://127.0.0.1:{free_port()}"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "inference_service.serve",
            "--checkpoint",
            str(tiny_checkpoint),
            "--bind",
            address,
            "--device",
            "cpu",
            "--stop-with-stdin",  # as the add-on starts it; its watch must not spoil an exit
        ],
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=stop_signals_by_default,  # under nohup the service keeps SIGHUP ignored
    )
    try:
        with Client(address, context=zmq.Context.instance()) as client:
            # Listening at once: `busy` while the model loads (a few seconds), then served.
            status = client.wait_serving(
                120, gone=lambda: None if process.poll() is None else process.stderr.read()
            )
            assert status.device == "cpu" and status.version
            reply = client.request(PoseRequest(client.new_id(), "wave"), TIMEOUT_S)
            assert isinstance(reply, PoseReply)
        if stop.startswith("SIG"):  # SIGHUP: the terminal it was started in closed
            process.send_signal(getattr(signal, stop))
        else:
            process.stdin.close()
        assert process.wait(TIMEOUT_S) == 0
    finally:
        if process.poll() is None:
            process.kill()
    events = [json.loads(line) for line in process.stderr.read().splitlines()]  # only JSON
    names = [e.get("event") for e in events]
    assert names[0] == "listening" and "start" in names and names[-1] == "stop"  # then loaded
    # What an admin watching a load of minutes needs: which model, where, in what precision.
    [loading] = [e for e in events if e.get("event") == "loading"]
    assert (loading["checkpoint"], loading["device"], loading["quantization"]) == (
        str(tiny_checkpoint.resolve()),
        "cpu",
        "none",
    )
    [started] = [e for e in events if e.get("event") == "start"]
    assert started["dtype"] == "float32" and started["device"] == "cpu"
    timed = [e for e in events if e.get("event") == "request" and e["op"] == "pose"]
    assert timed and timed[0]["ok"] is True and timed[0]["ms"] >= 0


def test_chatpose_serve_that_loses_its_stdin_while_loading_exits_at_once(tiny_checkpoint):
    # Blender crashed while the model loaded: the load is not worth finishing.
    address = f"tcp://127.0.0.1:{free_port()}"
    command = [sys.executable, "-m", "inference_service.serve", "--checkpoint"]
    process = subprocess.Popen(
        [*command, str(tiny_checkpoint), "--bind", address, "--stop-with-stdin"],
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    process.stdin.close()
    try:
        assert process.wait(TIMEOUT_S) == 0
    finally:
        if process.poll() is None:
            process.kill()
    events = [json.loads(line).get("event") for line in process.stderr.read().splitlines()]
    assert "start" not in events and events[-1] == "stop"  # it never served


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--bind", "tcp://0.0.0.0:5555", "--checkpoint", "."], "not a loopback address"),
        (["--bind", "garbage", "--checkpoint", "."], "'garbage' is not a ZeroMQ address"),
        (["--bind", "inproc://x", "--checkpoint", "."], "inproc reaches only this process"),
        (["--checkpoint", "/no/such/dir"], "/no/such/dir does not exist"),
        # Refused before listening (a load started and stopped first): a file, another folder.
        (
            ["--checkpoint", str(serve.DEMO_CHECKPOINT / "chatpose.json")],
            "chatpose.json: a file, not a checkpoint's folder",
        ),
        (["--checkpoint", str(serve.DEMO_CHECKPOINT / "base")], "base: not a ChatPose checkpoint"),
        (["--curve-clients", "."], "go together"),
        (["--max-new-tokens", "2000"], "--max-new-tokens: at most 512, got 2000"),
    ],
)
def test_serve_refuses_bad_configuration_clearly(argv, message, capsys):
    if "--bind" not in argv:  # not the default port: a service the user runs may hold it
        argv = [*argv, "--bind", f"tcp://127.0.0.1:{free_port()}"]
    assert serve.main(argv) == serve.EXIT_USAGE
    err = capsys.readouterr().err
    assert message in err and "listening" not in err


@pytest.mark.parametrize(
    ("secret", "clients", "message"),
    [
        ("authorized_clients", "authorized_clients", "is not a readable CURVE key file"),
        ("garbage.key_secret", "authorized_clients", "is not a readable CURVE key file"),
        ("garbage.key_secret", "authorized_clients", "move it away and run python -m inference"),
        ("nope.key_secret", "authorized_clients", "--curve-secret-key: no file at"),
        ("server.key", "authorized_clients", "holds a public key only"),
        ("server.key_secret", "server.key", "is not a folder"),
        ("server.key_secret", "x" * 300, "File name too long"),  # a key's text for a path
        ("server.key_secret", "empty", "holds no client public key"),
        ("short.key_secret", "authorized_clients", "not 40 Z85 characters"),
        # Z85 characters whose value is past 32 bits: a traceback from struct at start-up.
        ("wide.key_secret", "authorized_clients", "not 40 Z85 characters"),
        ("server.key_secret", "junk_clients", "holds a .key file that is not a CURVE key"),
        # The keys' folder itself: only the server's own public key, so every client refused.
        ("server.key_secret", ".", "holds secret keys (animator.key_secret, garbage.key_secret"),
        ("server.key_secret", "own", "holds only the server's own public key, so every client"),
    ],
)
def test_serve_checks_curve_keys_before_loading_a_model(tmp_path, capsys, secret, clients, message):
    make_keys(tmp_path, ["animator"])
    (tmp_path / "garbage.key_secret").write_text("not a key")
    (tmp_path / "empty").mkdir()
    (tmp_path / "short.key_secret").write_text(
        'curve\n    public-key = "abcde"\n    secret-key = "fghij"\n'
    )
    (tmp_path / "wide.key_secret").write_text(
        f'curve\n    public-key = "{"#" * 40}"\n    secret-key = "{"#" * 40}"\n'
    )
    (tmp_path / "own").mkdir()
    shutil.copy(tmp_path / "server.key", tmp_path / "own")
    (tmp_path / "junk_clients").mkdir()
    (tmp_path / "junk_clients" / "bob.key").write_text("not a key")
    argv = [
        "--curve-secret-key",
        str(tmp_path / secret),
        "--curve-clients",
        str(tmp_path / clients),
    ]
    # A checkpoint that does not exist: the keys are named first, before any loading.
    assert serve.main([*argv, "--checkpoint", "/no/such/dir"]) == serve.EXIT_USAGE
    assert message in capsys.readouterr().err


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_serve_warns_of_a_secret_key_other_users_may_read(tmp_path, capsys):
    keys = tmp_path / "My Keys"
    make_keys(keys, ["animator"])  # owner-only, as it makes them
    secret = keys / "server.key_secret"
    argv = ["--curve-secret-key", str(secret), "--curve-clients", str(keys / "authorized_clients")]
    assert serve.main([*argv, "--checkpoint", "/no/such/dir"]) == serve.EXIT_USAGE
    assert "can be read by other users" not in capsys.readouterr().err
    secret.chmod(0o644)  # copied with a tool that does not keep permissions
    assert serve.main([*argv, "--checkpoint", "/no/such/dir"]) == serve.EXIT_USAGE
    err = capsys.readouterr().err
    assert "can be read by other users of this machine (mode 644)" in err
    assert f"chmod 600 '{secret}'" in err and '"event": "key_exposed"' in err  # to paste


def test_serve_stops_cleanly_on_one_signal_and_at_once_on_a_second(monkeypatch):
    calls, now = [], [0.0]
    handler = serve.SignalStop(
        lambda: calls.append("stop"), lambda code: calls.append(code), clock=lambda: now[0]
    )
    handler(signal.SIGTERM)
    assert calls == ["stop"]
    now[0] = 0.01
    handler(signal.SIGTERM)  # the same stop, sent by `timeout` to the process, then its group
    assert calls == ["stop"]
    now[0] = 5.0
    handler(signal.SIGINT)  # the user presses Ctrl-C again while the last batch runs
    assert calls == ["stop", 128 + signal.SIGINT]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_while_the_model_loads_is_logged(monkeypatch, capfd, signum, stops_by_default):
    # The daemon review: SIGTERM's default ended it without a line, as SIGINT did not.
    def stopped(args):
        os.kill(os.getpid(), signum)
        time.sleep(5)  # the handler raises in here
        raise AssertionError("not stopped")

    monkeypatch.setattr(serve, "_load_backend", stopped)
    assert serve.main(["--bind", f"tcp://127.0.0.1:{free_port()}"]) == serve.EXIT_INTERRUPTED
    assert '"event": "stop"' in capfd.readouterr().err


def test_the_same_stop_sent_again_while_loading_stops_once(monkeypatch):
    # The late review: the second of two signals while the model loaded met the default
    # handler again (SIGTERM's ends the process: exit 143, no line). Ctrl-C here, whose
    # default would raise out of main.
    listening = serve._listening_server

    def stopped_twice(args):
        server = listening(args)
        stop = server.stop

        def stop_after_a_second_signal():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)  # a handler runs in here
            stop()

        server.stop = stop_after_a_second_signal
        return server

    def loading(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(serve, "_listening_server", stopped_twice)
    monkeypatch.setattr(serve, "_load_backend", loading)
    assert serve.main(["--bind", f"tcp://127.0.0.1:{free_port()}"]) == serve.EXIT_INTERRUPTED


def test_a_server_that_fails_while_serving_is_no_clean_exit(monkeypatch, capsys):
    from inference_service import server as server_module

    from .scripted_backend import ScriptedBackend

    def crash(self):
        raise RuntimeError("a bug in the I/O loop")

    monkeypatch.setattr(server_module.Server, "serve_forever", crash)
    monkeypatch.setattr(serve, "_load_backend", lambda args: ScriptedBackend())
    handlers = {n: signal.getsignal(n) for n in (signal.SIGINT, signal.SIGTERM)}
    try:
        assert serve.main(["--bind", f"tcp://127.0.0.1:{free_port()}"]) == serve.EXIT_FAILED
    finally:  # main sets its own, for the rest of a service's life
        for number, handler in handlers.items():
            signal.signal(number, handler)
    assert "the server failed: RuntimeError('a bug in the I/O loop')" in capsys.readouterr().err
    # The objects frozen out of the garbage collector's walks once the model loaded are let go
    # (frozen, a cycle holding bpy outlived the interpreter, and this test process hung at its
    # exit in bpy's sound shutdown).
    assert gc.get_freeze_count() == 0


def test_a_client_gone_while_the_model_loads_is_forgotten_without_a_scheduler():
    from inference_service.server import Server

    server = Server(None, None, f"tcp://127.0.0.1:{free_port()}")
    try:
        for client in (b"gone", b"stays"):  # a reply each waiting, a request each logged
            server._held.append([client, b"reply"])
            server._received[(client, "r1")] = [(0.0, "pose")]
        server._stalled_since[b"gone"] = 0.0
        server._drop_clients([b"gone"])  # what an unreachable client's reply leads to
        assert [frames[0] for frames in server._held] == [b"stays"]
        assert list(server._received) == [(b"stays", "r1")] and not server._stalled_since
    finally:
        server.close()


def test_serve_without_a_checkpoint_names_the_missing_demo(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(serve, "DEMO_CHECKPOINT", tmp_path / "not-built")
    assert serve.main(["--bind", f"tcp://127.0.0.1:{free_port()}"]) == serve.EXIT_USAGE
    assert "make demo-model" in capsys.readouterr().err


@pytest.mark.parametrize("terminal", [True, False])
def test_a_start_up_error_is_said_once_on_a_terminal_and_logged_for_a_log_reader(
    monkeypatch, tmp_path, capsys, terminal
):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: terminal)
    # A port of its own: the default one may be taken on the machine (it binds first).
    argv = ["--checkpoint", str(tmp_path / "none"), "--bind", f"tcp://127.0.0.1:{free_port()}"]
    assert serve.main(argv) == serve.EXIT_USAGE
    lines = capsys.readouterr().err.splitlines()
    plain = f"chatpose-serve: --checkpoint: {tmp_path / 'none'} does not exist"
    if terminal:
        assert lines == [plain]
    else:  # the JSON line for log readers, the plain one last (the add-on shows the last line)
        assert '"event": "config_error"' in lines[0] and lines[1:] == [plain]


@pytest.mark.parametrize("terminal", [True, False])
def test_a_bad_argument_is_logged_for_a_log_reader_too(monkeypatch, capsys, terminal):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: terminal)
    with pytest.raises(SystemExit) as stop:
        serve.main(["--max-batch", "0"])
    lines = capsys.readouterr().err.splitlines()
    assert stop.value.code == serve.EXIT_USAGE
    assert lines[-1] == (
        "chatpose-serve: error: argument --max-batch: expected a whole number of at least 1, "
        "got '0'"
    )
    logged = [json.loads(line) for line in lines if line.startswith("{")]
    if terminal:
        assert logged == []
    else:
        assert [(e["level"], e["event"], e["logger"]) for e in logged] == [
            ("error", "config_error", "chatpose.serve")
        ]
        assert logged[0]["msg"] == lines[-1].removeprefix("chatpose-serve: error: ")


def test_a_bad_argument_with_stderr_closed_is_still_a_usage_error(monkeypatch):
    monkeypatch.setattr(sys, "stderr", None)  # `2>&-`
    with pytest.raises(SystemExit) as stop:
        serve.main(["--max-batch", "0"])
    assert stop.value.code == serve.EXIT_USAGE


def test_serve_names_an_address_in_use_before_loading_any_model(tmp_path, capsys):
    with zmq.Context() as context, context.socket(zmq.ROUTER) as taken:
        port = taken.bind_to_random_port("tcp://127.0.0.1")
        # The checkpoint does not exist: the address is checked before it is even looked at.
        argv = ["--bind", f"tcp://127.0.0.1:{port}", "--checkpoint", str(tmp_path / "none")]
        assert serve.main(argv) == serve.EXIT_USAGE
    err = capsys.readouterr().err
    assert "already in use" in err and "--bind" in err


def test_serve_rejects_a_bad_checkpoint_without_a_traceback(tmp_path, capsys):
    (tmp_path / "chatpose.json").write_text("{not json")
    argv = ["--checkpoint", str(tmp_path), "--bind", f"tcp://127.0.0.1:{free_port()}"]
    assert serve.main(argv) == serve.EXIT_USAGE
    assert "chatpose.json" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--max-batch", "--max-queue", "--timeout-ms"])
def test_serve_rejects_non_positive_numbers(flag, capsys):
    for value in ("0", "x"):  # "x": not "invalid positive_int value"
        with pytest.raises(SystemExit) as info:
            serve.main([flag, value])
        assert info.value.code == 2
        assert f"expected a whole number of at least 1, got '{value}'" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["-1", "inf", "nan", "5000", "abc"])
def test_serve_rejects_a_batch_wait_out_of_range(value, capsys):
    with pytest.raises(SystemExit) as info:  # inf used to kill the scheduler's thread
        serve.main(["--max-wait-ms", value])
    assert info.value.code == 2
    assert f"expected 0 to 1000 ms, got {value}" in capsys.readouterr().err


def test_serve_works_offline_whatever_the_environment_said(monkeypatch, tmp_path, capsys):
    import os

    import huggingface_hub.constants

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(name, "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    argv = ["--checkpoint", str(tmp_path / "none"), "--bind", f"tcp://127.0.0.1:{free_port()}"]
    assert serve.main(argv) == serve.EXIT_USAGE
    assert os.environ["HF_HUB_OFFLINE"] == "1" and huggingface_hub.constants.HF_HUB_OFFLINE
