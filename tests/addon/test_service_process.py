"""The local chatpose-serve process manager, without Blender: real child processes."""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from blender_addon.core import service_process
from blender_addon.core.service_process import (
    EXITED,
    RUNNING,
    STOPPED,
    ProcessState,
    ServiceProcess,
    ServiceProcessError,
    address_in_use,
    child_environment,
    log_name_for,
    serve_command,
    summarize_log_line,
)

ROOT = Path(__file__).resolve().parents[2]
SLEEPER = [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)"]


def wait_for(predicate, timeout_s: float = 10.0):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "gave up waiting"
        time.sleep(0.02)


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:  # a zombie still answers kill(0); it is gone for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] == "Z"
    except (OSError, IndexError):
        return True


def test_only_a_port_that_something_holds_is_called_in_use(monkeypatch):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        held = listener.getsockname()[1]
        assert address_in_use(f"tcp://127.0.0.1:{held}")

    class Refused(socket.socket):  # a port below 1024 for a user who may not bind it
        def bind(self, address):
            raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(service_process.socket, "socket", Refused)
    assert not address_in_use("tcp://127.0.0.1:80")  # chatpose-serve's own error says why

    # On Windows ZeroMQ holds its port exclusively: a probe with SO_REUSEADDR is refused
    # there as "access denied" (and the port was called free), a plain one as "in use".
    class Exclusive(socket.socket):
        reuse = False

        def setsockopt(self, level, option, value):
            self.reuse = self.reuse or option == socket.SO_REUSEADDR

        def bind(self, address):
            if self.reuse:
                raise PermissionError(errno.EACCES, "An attempt was made to access a socket")
            raise OSError(errno.EADDRINUSE, "Only one usage of each socket address")

    monkeypatch.setattr(service_process.socket, "socket", Exclusive)
    monkeypatch.setattr(service_process.sys, "platform", "win32")
    assert address_in_use("tcp://127.0.0.1:5555")
    monkeypatch.setattr(service_process.socket, "socket", Refused)  # a port Windows reserves
    assert not address_in_use("tcp://127.0.0.1:5555")


def test_an_ipc_path_a_service_listens_on_is_in_use_and_a_stale_one_not(tmp_path):
    path = tmp_path / "chatpose.sock"
    assert not address_in_use(f"ipc://{path}")  # nothing there
    with socket.socket(socket.AF_UNIX) as listener:  # a service started in a terminal
        listener.bind(str(path))
        listener.listen()
        assert address_in_use(f"ipc://{path}")
    assert not address_in_use(f"ipc://{path}")  # its file left behind: the bind replaces it


def test_serve_command_names_what_is_missing(tmp_path, monkeypatch):
    with pytest.raises(ServiceProcessError, match="set the Python interpreter"):
        serve_command("", str(tmp_path), "tcp://127.0.0.1:5555")
    with pytest.raises(ServiceProcessError, match="not found"):
        serve_command(str(tmp_path / "nope" / "python"), str(tmp_path), "tcp://127.0.0.1:5555")
    with pytest.raises(ServiceProcessError, match="is a folder; pick the python program in it"):
        serve_command(str(tmp_path), str(tmp_path), "tcp://127.0.0.1:5555")  # its bin, say
    with pytest.raises(ServiceProcessError, match="set the checkpoint"):
        serve_command(sys.executable, " ", "tcp://127.0.0.1:5555")
    with pytest.raises(ServiceProcessError, match="does not exist"):
        serve_command(sys.executable, str(tmp_path / "ckpt"), "tcp://127.0.0.1:5555")
    for program in ("chatpose-serve", "chatpose", "pip3.exe"):  # beside python, picked instead
        (tmp_path / program).write_text("")
        with pytest.raises(ServiceProcessError, match=f"is the {program.removesuffix('.exe')} "):
            serve_command(str(tmp_path / program), str(tmp_path), "tcp://127.0.0.1:5555")
    (tmp_path / "chatpose.json").write_text("{}")  # a file of the checkpoint, picked
    with pytest.raises(ServiceProcessError, match=r"chatpose\.json' is a file; set its folder"):
        serve_command(sys.executable, str(tmp_path / "chatpose.json"), "tcp://127.0.0.1:5555")
    argv = serve_command(sys.executable, str(tmp_path), "tcp://127.0.0.1:5555", "cpu")
    # "~/..." as a user types it, and a folder relative to Blender's: the service runs elsewhere.
    monkeypatch.setenv("HOME", str(tmp_path.parent))
    for typed in ("~/" + tmp_path.name, os.path.relpath(tmp_path)):
        assert serve_command(sys.executable, typed, "tcp://127.0.0.1:5555", "cpu") == argv
    # The interpreter too: run from the log folder, a relative path would name nothing.
    relative = os.path.relpath(sys.executable)
    assert os.path.sep in relative and not os.path.isabs(relative)
    assert serve_command(relative, str(tmp_path), "tcp://127.0.0.1:5555", "cpu") == argv
    assert argv == [
        sys.executable,
        "-m",
        "inference_service.serve",
        "--checkpoint",
        str(tmp_path),
        "--bind",
        "tcp://127.0.0.1:5555",
        "--device",
        "cpu",
        "--stop-with-stdin",
    ]
    on_gpu = serve_command(sys.executable, str(tmp_path), "tcp://127.0.0.1:5555", "cuda:1", "4bit")
    assert on_gpu[-4:] == ["--device", "cuda:1", "--stop-with-stdin", "--load-in-4bit"]


def test_a_real_serve_that_fails_shows_its_exit_code_and_last_line(tmp_path):
    manager = ServiceProcess(str(tmp_path / "logs"))
    assert manager.poll().state == STOPPED and manager.poll().describe() == "stopped"
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    # chatpose-serve refuses this bind before it loads anything (so no torch import here).
    argv = serve_command(sys.executable, str(checkpoint), "tcp://0.0.0.0:5555", "cpu")
    state = manager.start(argv, env=child_environment(dict(os.environ)))
    assert state.state in (RUNNING, EXITED)
    wait_for(lambda: manager.poll().state == EXITED, 30)
    state = manager.poll()
    assert state.returncode == 2 and not state.alive
    assert "not a loopback address" in state.last_line  # chatpose-serve's own message
    assert state.last_line.startswith("chatpose-serve: refusing to listen")
    assert state.describe().startswith("exited with code 2: ")


def test_the_service_runs_in_its_log_folder_not_in_blender_s(tmp_path, monkeypatch):
    # With -m, the working folder comes first on the path: an inference_service/ folder in
    # Blender's (launched from a checkout) would shadow the installed package.
    monkeypatch.chdir(tmp_path)
    manager = ServiceProcess(str(tmp_path / "logs"))
    manager.start([sys.executable, "-c", "import os; print(os.getcwd())"])
    wait_for(lambda: manager.poll().state == EXITED, 30)
    assert Path(manager.log_path).read_text().strip() == str(tmp_path / "logs")


def test_two_local_services_on_two_ports_keep_a_log_each(tmp_path):
    # Two Blenders, each with a service of its own, once truncated and wrote over one file.
    assert log_name_for("tcp://127.0.0.1:5555") == "chatpose-serve-5555.log"
    assert log_name_for("tcp://[::1]:6000") == "chatpose-serve-6000.log"
    # ipc:// addresses, one file each: the file's lock stands for the address.
    assert log_name_for("ipc:///tmp/a") != log_name_for("ipc:///tmp/b")
    digest = hashlib.sha256(b"ipc:///tmp/a").hexdigest()[:10]  # the same in every Blender
    assert log_name_for("ipc:///tmp/a") == f"chatpose-serve-{digest}.log"
    managers = [ServiceProcess(str(tmp_path)) for _ in range(2)]
    for port, manager in zip((5555, 5556), managers, strict=True):
        say = f"print('service on {port}', flush=True)"
        manager.start([sys.executable, "-c", say], log_name=log_name_for(f"tcp://127.0.0.1:{port}"))
    for manager in managers:
        wait_for(lambda manager=manager: manager.poll().state == EXITED, 30)
    assert [manager.poll().last_line for manager in managers] == [
        "service on 5555",
        "service on 5556",
    ]


def test_a_python_without_the_service_s_packages_is_named_as_the_setting_to_fix(tmp_path):
    manager = ServiceProcess(str(tmp_path))
    # What a Python without the project's packages prints when asked to run chatpose-serve.
    manager.start([sys.executable, "-c", "import no_such_chatpose_package"])
    wait_for(lambda: manager.poll().state == EXITED, 30)
    described = manager.poll().describe()
    assert "No module named 'no_such_chatpose_package'" in described
    assert "the Python set in the add-on's preferences (Local Service) lacks" in described


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_a_service_killed_by_the_system_is_not_reported_as_its_last_line(tmp_path):
    manager = ServiceProcess(str(tmp_path))
    manager.start(SLEEPER)
    wait_for(lambda: "up" in Path(manager.log_path).read_text())
    os.kill(manager.pid, signal.SIGKILL)  # as the out-of-memory killer does, mid-load
    wait_for(lambda: manager.poll().state == EXITED)
    # A likely cause, said as one; not the line it wrote before the kill (the callers name
    # its log instead), which reads as the reason.
    assert (
        manager.poll().describe() == "exited: killed by SIGKILL; often the system ran out of memory"
    )
    manager.start(SLEEPER)
    wait_for(lambda: manager.poll().state != EXITED)
    os.kill(manager.pid, signal.SIGHUP)  # signal 1: the return code -1, a signal all the same
    wait_for(lambda: manager.poll().state == EXITED)
    assert manager.poll().describe() == "exited: killed by SIGHUP"


def test_a_service_older_than_the_add_on_is_named_as_what_to_update(tmp_path):
    manager = ServiceProcess(str(tmp_path))
    older = "import sys; sys.exit('serve.py: error: unrecognized arguments: --stop-with-stdin')"
    manager.start([sys.executable, "-c", older])
    wait_for(lambda: manager.poll().state == EXITED, 30)
    described = manager.poll().describe()
    assert "unrecognized arguments: --stop-with-stdin" in described
    assert "older than this add-on: update it (git pull, then make setup)" in described
    Path(manager.log_path).unlink()  # read once: the panel polls on every redraw
    assert manager.poll().describe() == described
    # Another program's usage error is not the service's age: no update advised.
    usage = "import sys; sys.exit('prog: error: unrecognized arguments: -m inference_service')"
    manager.start([sys.executable, "-c", usage])
    wait_for(lambda: manager.poll().state == EXITED, 30)
    assert "older than this add-on" not in manager.poll().describe()


@pytest.mark.parametrize(
    ("last_line", "hint"),
    [
        (
            "chatpose-serve: --device cuda:0: CUDA is not available here (no GPU, or a CPU "
            "build of torch); use --device cpu or auto, or a CUDA build of torch",
            "; in the add-on's preferences (Local Service), --device is Device (and GPU)",
        ),
        (
            "chatpose-serve: --load-in-8bit needs the 'bitsandbytes' package",
            "; in the add-on's preferences (Local Service), --load-in-8bit is Weights: 8-bit",
        ),
        (
            "chatpose-serve: --load-in-4bit: 4-bit and 8-bit loading need a CUDA device, and this "
            "runs on the cpu (--device)",
            "; set Weights to As Stored in the add-on's preferences (Local Service), or run the "
            "service on a machine with a GPU",
        ),
    ],
)
def test_a_start_refused_for_an_option_names_the_preference_that_set_it(last_line, hint):
    # The animator set Device and Weights in the preferences, and never typed --device.
    described = ProcessState(EXITED, returncode=2, last_line=last_line).describe()
    assert described == f"exited with code 2: {last_line}{hint}"


def test_start_stop_and_kill_after_the_grace_time(tmp_path):
    manager = ServiceProcess(str(tmp_path), grace_s=0.3)
    state = manager.start(SLEEPER)
    assert state.state == RUNNING and f"pid {state.pid}" in state.describe()
    with pytest.raises(ServiceProcessError, match="already running"):
        manager.start(SLEEPER)
    wait_for(lambda: "up" in Path(manager.log_path).read_text())
    state = manager.stop()  # SIGTERM, returns at once
    wait_for(lambda: manager.poll().state == STOPPED)
    assert manager.poll().describe() == "stopped"

    stubborn = [
        sys.executable,
        "-c",
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('up', flush=True); time.sleep(60)",
    ]
    manager.start(stubborn)
    wait_for(lambda: "up" in Path(manager.log_path).read_text())
    pid = manager.pid
    manager.stop()
    time.sleep(0.1)
    assert manager.poll().alive  # ignored SIGTERM, grace time not over
    wait_for(lambda: not manager.poll().alive)  # poll() killed it after the grace time
    assert gone(pid)


def test_stop_pressed_twice_signals_once_and_keeps_the_kill_time(tmp_path):
    now = [0.0]
    manager = ServiceProcess(str(tmp_path), grace_s=5.0, clock=lambda: now[0])
    counting = [
        sys.executable,
        "-c",
        "import signal, time; signal.signal(signal.SIGTERM, lambda *a: print('term', "
        "flush=True)); print('up', flush=True); time.sleep(60)",
    ]  # chatpose-serve takes a second SIGTERM for "exit now": this one counts them
    manager.start(counting)
    wait_for(lambda: "up" in Path(manager.log_path).read_text())
    manager.stop()
    wait_for(lambda: "term" in Path(manager.log_path).read_text())
    now[0] = 4.0
    manager.stop()  # a double click, or a second press while it stops
    now[0] = 5.0  # the first press's deadline: killed, not put off to 9 s
    wait_for(lambda: not manager.poll().alive)
    assert Path(manager.log_path).read_text().count("term") == 1


@pytest.mark.skipif(sys.platform == "win32", reason="the log lock is POSIX's flock")
def test_a_second_blender_cannot_start_a_service_on_the_same_address(tmp_path):
    first, second = ServiceProcess(str(tmp_path)), ServiceProcess(str(tmp_path))
    first.start(SLEEPER, log_name="chatpose-serve-5555.log")
    wait_for(lambda: "up" in Path(first.log_path).read_text())
    # Or this Blender's own, still stopping after the add-on was disabled and enabled again.
    with pytest.raises(ServiceProcessError, match="in another Blender .*, or one stopped here"):
        second.start(SLEEPER, log_name="chatpose-serve-5555.log")
    assert "up" in Path(first.log_path).read_text()  # its log not emptied
    assert second.log_path != first.log_path  # nor shown as the refused one's
    second.start(SLEEPER, log_name="chatpose-serve-5556.log")  # another address: fine
    second.stop(wait=True)
    first.stop(wait=True)  # its service gone, the address is free again
    second.start(SLEEPER, log_name="chatpose-serve-5555.log")
    wait_for(lambda: "up" in Path(second.log_path).read_text())
    assert Path(second.log_path).read_text() == "up\n"  # a fresh log for the new service
    second.stop(wait=True)


@pytest.mark.skipif(sys.platform == "win32", reason="the log lock is POSIX's flock")
def test_a_log_folder_that_cannot_lock_does_not_stop_a_start(tmp_path, monkeypatch):
    import errno
    import fcntl

    def no_locks(fd, operation):  # some network file systems
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    manager = ServiceProcess(str(tmp_path))
    assert manager.start(SLEEPER).state == RUNNING
    manager.stop(wait=True)


def test_a_program_that_cannot_start_is_a_clear_error(tmp_path):
    manager = ServiceProcess(str(tmp_path))
    with pytest.raises(ServiceProcessError, match="could not start"):
        manager.start([str(tmp_path / "missing-python")])
    assert manager.poll().state == STOPPED
    (tmp_path / "file").write_text("")  # a log folder that cannot be made
    blocked = ServiceProcess(str(tmp_path / "file" / "logs"))
    with pytest.raises(ServiceProcessError, match="cannot write the service's log"):
        blocked.start([sys.executable, "-c", "pass"])


def test_the_child_is_stopped_when_the_parent_python_exits(tmp_path):
    """What happens when Blender quits: atexit stops the service. (Linux's death signal is
    turned off here, or it would stop the child without atexit: see the next test.)"""
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        from blender_addon.core import service_process
        from blender_addon.core.service_process import ServiceProcess
        service_process._die_with_parent_hook = lambda: None
        manager = ServiceProcess({str(tmp_path)!r})
        manager.start({SLEEPER!r})
        print(manager.pid, flush=True)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=30, check=True
    )
    pid = int(out.stdout.split()[0])
    wait_for(lambda: gone(pid), 5)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_the_child_dies_with_a_parent_that_is_killed(tmp_path):
    """Blender crashing (no atexit): the kernel sends the child SIGTERM."""
    script = textwrap.dedent(
        f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from blender_addon.core.service_process import ServiceProcess
        manager = ServiceProcess({str(tmp_path)!r})
        manager.start({SLEEPER!r})
        print(manager.pid, flush=True)
        time.sleep(60)
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    pid = int(parent.stdout.readline())
    assert not gone(pid)
    parent.kill()
    parent.wait(10)
    wait_for(lambda: gone(pid), 5)


def test_stop_on_windows_asks_by_closing_standard_input_not_by_a_kill(tmp_path, monkeypatch):
    # Windows has no SIGTERM: terminate() is TerminateProcess, which would cut a batch short.
    manager = ServiceProcess(str(tmp_path))
    asked = "import sys; sys.stdin.read(); print('stopping cleanly', flush=True)"
    manager.start([sys.executable, "-c", asked])
    killed = []
    monkeypatch.setattr(manager._process, "terminate", lambda: killed.append("terminate"))
    monkeypatch.setattr(service_process.sys, "platform", "win32")
    state = manager.stop(wait=True, timeout_s=10)
    assert killed == [] and state.state == STOPPED
    assert "stopping cleanly" in Path(manager.log_path).read_text()


def test_stop_all_stops_every_live_process(tmp_path, monkeypatch):
    import weakref

    # Only this test's processes (the session's tiny service must keep running).
    monkeypatch.setattr(service_process, "_live", weakref.WeakSet())
    managers = [ServiceProcess(str(tmp_path / str(i))) for i in range(2)]
    for manager in managers:
        manager.start(SLEEPER)
    service_process.stop_all(timeout_s=5)
    assert [m.poll().state for m in managers] == [STOPPED, STOPPED]


def test_log_lines_are_summarized_for_the_panel():
    line = '{"ts": "x", "level": "error", "logger": "l", "msg": "model failed to load"}'
    assert summarize_log_line(line) == "error: model failed to load"
    with_exc = '{"level": "error", "msg": "boom", "exception": "Traceback\\nValueError: bad"}'
    assert summarize_log_line(with_exc) == "error: boom (ValueError: bad)"
    assert summarize_log_line("chatpose-serve: --checkpoint: x does not exist") == (
        "chatpose-serve: --checkpoint: x does not exist"
    )
    assert len(summarize_log_line("y" * 1000)) == 300
    child = child_environment({"PYTHONHOME": "/blender/python", "A": "1"})
    assert "PYTHONHOME" not in child and child["A"] == "1"
    assert child["PYTHONUTF8"] == "1"  # its log is read as UTF-8 (Windows writes cp1252)
