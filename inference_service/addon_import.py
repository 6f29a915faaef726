"""Importing the Blender add-on's own modules from the service side (the demo, the renders).

The project's package does not install `blender_addon` (it ships as a Blender extension, see
build_addon.py), so from a checkout its root goes on sys.path when needed."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def ensure_addon_importable() -> None:
    try:
        import blender_addon  # noqa: F401
    except ImportError:
        if not (ROOT / "blender_addon" / "__init__.py").is_file():
            raise ImportError(
                "blender_addon is not importable: run this from a checkout of chatpose-blender"
            ) from None
        sys.path.insert(0, str(ROOT))
