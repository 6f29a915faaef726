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
