"""Which frames poses go on, and the frame rate of keyed frames read back."""

from __future__ import annotations

from collections.abc import Iterable

# Blender's frames go from -MAX_FRAME to MAX_FRAME (its MAXFRAME): a key past them is never
# played, and far past them (2^24) float32 keys no longer hold whole frames, so two lines would
# share one key while the batch record says each has its own.
MAX_FRAME = 1_048_574


def frames_for(count: int, start: int, step: int = 1) -> list[int]:
    """``count`` frames from ``start``, ``step`` apart (step >= 1), all within Blender's."""
    if count < 0:
        raise ValueError(f"count: expected >= 0, got {count}")
    if step < 1:
        raise ValueError(f"step: expected >= 1, got {step}")
    last = start + (count - 1) * step
    if count and not (-MAX_FRAME <= start and last <= MAX_FRAME):
        raise ValueError(
            f"{count} poses from frame {start}, {step} apart, end at frame {last}; Blender's "
            f"frames go from {-MAX_FRAME} to {MAX_FRAME}: lower Start or Step"
        )
    return [start + i * step for i in range(count)]


def keyed_frame_list(frames: Iterable[float]) -> list[int]:
    """Sorted distinct whole frames of keyframe positions. A key between frames is a ValueError
    naming it: a motion holds whole frames, and rounding would move or drop that pose."""
    frames = sorted(set(frames))
    between = [f for f in frames if abs(f - round(f)) > 1e-3]
    if between:
        raise ValueError(
            f"a key lies between frames (at {between[0]:g}); snap the keys to whole frames "
            "(Key > Snap > Nearest Frame) and try again"
        )
    return sorted({round(f) for f in frames})


def uniform_step(frames: list[int]) -> int | None:
    """The common gap of evenly spaced frames, None when uneven (or fewer than two)."""
    if len(frames) < 2:
        return None
    gaps = {b - a for a, b in zip(frames, frames[1:], strict=False)}
    return gaps.pop() if len(gaps) == 1 else None


def motion_fps(frames: list[int], scene_fps: float) -> float:
    """Frame rate of a motion made of the keyed ``frames`` of a scene playing at ``scene_fps``.

    Keys every s frames make a motion at scene_fps / s; uneven keys keep the scene's rate.
    """
    step = uniform_step(frames)
    return scene_fps / step if step else scene_fps
