"""Makes ``blender_addon`` and ``build_addon`` importable (the project installs neither), and
gives the bpy tests a fresh Blender with the add-on enabled."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

ADDON = "blender_addon"


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "network: may download from the package registry once (cached afterwards)"
    )


@pytest.fixture
def blender():
    """Factory settings with an empty scene, the add-on enabled as a (legacy) add-on, so its
    preferences exist; disabled again afterwards."""
    import addon_utils
    import bpy

    if bpy.context.preferences.addons.get(ADDON) is not None:
        addon_utils.disable(ADDON, default_set=True)
    bpy.ops.wm.read_factory_settings(use_empty=True)
    module = addon_utils.enable(ADDON, default_set=True, handle_error=_raise)
    assert module is not None, "the add-on did not enable"
    yield bpy
    addon_utils.disable(ADDON, default_set=True, handle_error=_raise)


def _raise(exc: BaseException) -> None:
    raise exc


@pytest.fixture
def reports(monkeypatch):
    """(level, message) of every report the internal chatpose.report operator makes."""
    from blender_addon.blender.chat_operators import CHATPOSE_OT_report

    made: list[tuple[str, str]] = []
    original = CHATPOSE_OT_report.execute

    def recording(self, context):
        made.append((self.level, self.message))
        return original(self, context)

    monkeypatch.setattr(CHATPOSE_OT_report, "execute", recording)
    return made


# --- services for the chat tests ----------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_service(tiny_checkpoint, tmp_path_factory):
    """A real `chatpose-serve` subprocess on loopback serving the tiny model; its address.
    Stopped at the end of the session."""
    from .helpers import free_port, start_tiny_service

    address = f"tcp://127.0.0.1:{free_port()}"
    manager = start_tiny_service(tiny_checkpoint, address, tmp_path_factory.mktemp("serve-log"))
    try:
        yield address
    finally:
        manager.stop(wait=True)


@pytest.fixture
def scripted_service():
    """An in-process server with the scripted stand-in model (instant answers; chat mode gives
    two poses); yields (address, backend). The backend records every work item it gets."""
    import threading

    from inference_service.server import Server
    from tests.service.scripted_backend import TIMEOUT_S, ScriptedBackend

    class Recording(ScriptedBackend):
        def __init__(self):
            super().__init__()
            self.items = []

        def answer_poses(self, items):
            self.items += list(items)
            return super().answer_poses(items)

        def answer_chat(self, item, stop=None):
            self.items.append(item)
            return super().answer_chat(item, stop)

    backend = Recording()
    server = Server(backend, backend.info, "tcp://127.0.0.1:*", max_batch=4, max_wait_ms=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.address, backend
    backend.release()
    server.stop()
    thread.join(TIMEOUT_S)
