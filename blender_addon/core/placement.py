"""Several people in one answer: which armature each pose goes on, and where new ones stand.

The first pose goes on the target armature. Pose ``k`` (k >= 1) goes on an armature named
``extra_person_name(target, k)``: created on demand ``k * spacing`` metres along world +X from
the target, and found again by that name on later answers (where it is left wherever the user
moved it).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

DEFAULT_SPACING_M = 1.0


MAX_NAME_BYTES = 63  # Blender's ID names


def extra_person_name(target_name: str, k: int) -> str:
    """The name of the armature for pose ``k`` (k >= 1) of an answer: "SMPL" -> "SMPL.person2"
    for the second person."""
    if k < 1:
        raise ValueError(f"k: the target itself is person 0; expected >= 1, got {k}")
    return suffixed_name(target_name, f".person{k + 1}")


def suffixed_name(name: str, suffix: str) -> str:
    """``name + suffix`` within Blender's 63 bytes for a name. Blender cuts a longer one, suffix
    and all: ``name`` is shortened instead, so that what is named so is found again by it, and
    ends in a hash of the whole name: two targets alike in their first 55 bytes
    ("..._Pair_A", "..._Pair_B") shared a person."""
    room = MAX_NAME_BYTES - len(suffix.encode("utf-8"))
    whole = name.encode("utf-8")
    if len(whole) <= room:
        return name + suffix
    mark = "~" + hashlib.sha1(whole).hexdigest()[:6]
    base = whole[: room - len(mark)].decode("utf-8", errors="ignore")
    return base + mark + suffix


def person_location(
    target_location: Sequence[float], k: int, spacing: float = DEFAULT_SPACING_M
) -> tuple[float, float, float]:
    """Where a new armature for pose ``k`` goes: beside the target, ``k * spacing`` along X."""
    x, y, z = (float(c) for c in target_location)
    return (x + k * spacing, y, z)
