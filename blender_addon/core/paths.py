"""Where the add-on keeps per-user data (pure: the caller passes the bpy functions in)."""

from __future__ import annotations

from collections.abc import Callable


def unquoted(path: str) -> str:
    """A path setting without the quotes around it that a pasted path may have (Windows
    Explorer's "Copy as path" adds them), and without spaces at its ends."""
    path = path.strip()
    if len(path) >= 2 and path[0] == path[-1] and path[0] in "\"'":
        return path[1:-1].strip()
    return path


def is_extension_package(package: str | None) -> bool:
    """True when the add-on runs as a Blender 4.2+ extension (``bl_ext.<repo>.<id>``)."""
    return bool(package) and package.startswith("bl_ext.") and package.count(".") >= 2


def user_data_dir(
    package: str | None,
    extension_path_user: Callable[..., str] | None,
    fallback: Callable[[], str],
) -> str:
    """``extension_path_user(package, create=True)`` for an extension, else ``fallback()``.

    Legacy installs and tests (the package is not ``bl_ext.*``), and Blender builds without
    ``bpy.utils.extension_path_user``, get the fallback directory.
    """
    if is_extension_package(package) and extension_path_user is not None:
        try:
            return extension_path_user(package, create=True)
        except ValueError:  # "does not name an extension": not registered as one after all
            pass
    return fallback()
