"""Fixtures shared by the whole suite."""

from __future__ import annotations

import os
import signal

import pytest

STOP_SIGNALS = (signal.SIGHUP, signal.SIGINT, signal.SIGTERM)


def stop_signals_by_default() -> None:
    """The stop signals as a shell started from a terminal leaves them, whatever the tests
    were started under (`nohup`, `&` in a script: ignored, which the commands leave so)."""
    for number in STOP_SIGNALS:
        signal.signal(number, signal.SIG_DFL)


@pytest.fixture
def stops_by_default():
    """`stop_signals_by_default` for this process, put back afterwards (SIGINT: Python's
    own handler, which raises KeyboardInterrupt)."""
    previous = {number: signal.getsignal(number) for number in STOP_SIGNALS}
    stop_signals_by_default()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    for number, handler in previous.items():
        signal.signal(number, handler)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """The tiny LLaVA of tests/service/tiny_llava.py (random weights) as a checkpoint directory,
    built in-process once per test session."""
    from transformers.utils import logging as hf_logging

    from tests.service import tiny_llava

    hf_logging.disable_progress_bar()
    tokenizer = tiny_llava.build_tokenizer()
    return tiny_llava.write_checkpoint(
        tmp_path_factory.mktemp("tiny") / "checkpoint",
        tiny_llava.build_llava(tokenizer),
        tiny_llava.build_processor(tokenizer),
        tiny_llava.build_head(),
    )


@pytest.fixture
def read_only(monkeypatch):
    """`read_only(path)`: makes a file read-only as this process sees it (`os.access`, which
    the code asks before it writes), also when the tests run as root, who may write anything."""

    def make(path) -> None:
        path.chmod(0o444)
        target = os.path.realpath(path)
        access = os.access

        def denied(name, mode, *args, **kwargs):
            if mode & os.W_OK and os.path.realpath(name) == target:
                return False
            return access(name, mode, *args, **kwargs)

        monkeypatch.setattr(os, "access", denied)

    return make


def pytest_runtest_makereport(item, call):
    """A Ctrl-C that lands inside a Blender operator comes out as the test's RuntimeError
    (bpy turns the KeyboardInterrupt into one): the run stops there, as at any other Ctrl-C,
    not at the end of the suite."""
    excinfo = call.excinfo
    if excinfo is None or not excinfo.errisinstance(RuntimeError):
        return
    text = str(excinfo.value)  # "Error: Python: Traceback ...\nKeyboardInterrupt\nLocation: ..."
    if text.startswith("Error: Python: Traceback") and "\nKeyboardInterrupt\n" in text:
        item.session.shouldstop = "interrupted (Ctrl-C inside a Blender operator)"
