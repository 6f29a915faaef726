"""Which frames poses go on, and the frame rate of keyed frames read back."""

from __future__ import annotations

import math
from collections.abc import Iterable
from fractions import Fraction

from shared_protocol.pose import FPS_RANGE

# Blender's frames go from -MAX_FRAME to MAX_FRAME (its MAXFRAME): a key past them is never
# played, and far past them (2^24) float32 keys no longer hold whole frames, so two lines would
# share one key while the batch record says each has its own.
MAX_FRAME = 1_048_574
# The most poses one import keys: keying runs on Blender's main thread, and 200,000 took 23 s
# and 3 GB (a million would take minutes and some 15 GB, enough to have Blender killed). An
# hour of capture at 24 fps is 86,400.
MAX_IMPORTED_POSES = 100_000


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


ON_FRAME = 1e-3  # a key this close to a frame is at it


def keyed_frame_list(frames: Iterable[float]) -> list[int]:
    """Sorted distinct whole frames of keyframe positions. A key between frames is a ValueError
    naming it: a motion holds whole frames, and rounding would move or drop that pose."""
    frames = sorted(set(frames))
    between = [f for f in frames if abs(f - round(f)) > ON_FRAME]
    if between:
        raise ValueError(
            f"a key lies between frames (at {between[0]:g}); snap the keys to whole frames "
            "(Key > Snap > Nearest Frame) and try again"
        )
    return sorted({round(f) for f in frames})


# Frames an export reads back between uneven keys (a key a few ms each) before the keys alone
# are read: past both this and twice the keys, a stray key far from the others would hold
# Blender for minutes. Two long clips keyed one after the other, with a gap, stay within it.
MAX_SAMPLED_FRAMES = 10_000


def motion_frames(keyed: list[int], scene_fps: float) -> tuple[list[int], float]:
    """The frames a motion samples from the keyed frames of a scene playing at ``scene_fps``,
    and its frame rate: every s frames from the first key to the last, s the greatest common
    gap between keys, at scene_fps / s. Evenly spaced keys are their own frames (keys every 2
    frames at 30 fps: 15 fps); uneven ones keep their timing, the frames between them as
    Blender plays them (keys at 1, 11, 21, 26: every 5 frames). More than
    ``MAX_SAMPLED_FRAMES`` frames and twice the keys between the first key and the last, or a
    rate below what a motion file holds: the keys alone, at ``scene_fps``
    (``keeps_timing`` tells)."""
    if len(keyed) < 2:
        return list(keyed), scene_fps
    step = math.gcd(*(b - a for a, b in zip(keyed, keyed[1:], strict=False)))
    frames = range(keyed[0], keyed[-1] + 1, step)
    too_slow = scene_fps / step < FPS_RANGE[0]  # no file holds a rate that low
    if too_slow or len(frames) > max(MAX_SAMPLED_FRAMES, 2 * len(keyed)):  # a stray key
        return list(keyed), scene_fps
    return list(frames), scene_fps / step


def same_rate(a: float, b: float) -> bool:
    """Rates that play a motion at the same speed, give or take NTSC's 0.1 % (29.97 for 30):
    a frame in a thousand, which no eye tells apart."""
    return abs(a / b - 1) < 0.005


def pace(playback: float, rate: float) -> str:
    """How a motion at `playback` fps, keyed a frame per frame, plays in a `rate` fps scene."""
    ratio = max(playback, rate) / min(playback, rate)
    how = "slower" if playback > rate else "faster"
    return f"{(ratio - 1) * 100:.0f} % {how}" if ratio < 2 else f"{ratio:.3g} times {how}"


def keeps_timing(frames: list[int]) -> bool:
    """Whether ``motion_frames``' frames are evenly spaced, so a file at one rate keeps the time
    between them (not so when it fell back to uneven keys alone)."""
    return len({b - a for a, b in zip(frames, frames[1:], strict=False)}) <= 1


def playback_rate(fps: int, fps_base: float) -> float:
    """A scene's frame rate, ``fps / fps_base``, as the rate it was set to. Blender keeps
    ``fps_base`` in float32, so 29.97 fps (a base of 1000/999) reads back as 29.970000018;
    the simplest fraction within float32's rounding of the base is the base that was set."""
    for denominator in (1, 10, 100, 1000, 10_000, 100_000):
        base = Fraction(fps_base).limit_denominator(denominator)
        if base and abs(base - Fraction(fps_base)) <= fps_base * 2**-24:
            return float(fps / base)
    return fps / fps_base
