"""A picture of the scene to send with a prompt ("Pose from Viewport"), as PNG bytes.

- With a window: the active 3D viewport drawn offscreen (``gpu.types.GPUOffScreen`` +
  ``draw_view3d``) with its own view and shading, read back and encoded with
  ``core.images.encode_png`` (nothing is written to disk).
- In background mode (``bpy.app.background``: no GPU drawing) or without a 3D viewport: the
  scene camera rendered with the Workbench engine at a small resolution into a temporary PNG,
  read back, and the scene's render settings restored.
"""

from __future__ import annotations

import os
import tempfile

import bpy
import numpy as np

from shared_protocol.protocol import MAX_IMAGE_ASPECT_RATIO

from ..core.images import centre_square, encode_png, shows_nothing

VIEWPORT_MAX_SIDE = 512  # the model crops to its own size (336 px for LLaVA-1.5)
SNAPSHOT_MAX_SIDE = 336


class CaptureError(Exception):
    """No picture could be taken; the message is for the user."""


def _scaled(width: int, height: int, max_side: int) -> tuple[int, int]:
    scale = min(1.0, max_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def find_view3d(context: bpy.types.Context):
    """(area, region, space) of the 3D viewport to capture: the context's own, else the
    largest one on the screen; None when there is none."""
    area = context.area if context.area is not None and context.area.type == "VIEW_3D" else None
    if area is None and context.screen is not None:
        areas = [a for a in context.screen.areas if a.type == "VIEW_3D"]
        area = max(areas, key=lambda a: a.width * a.height, default=None)
    if area is None:
        return None
    region = next((r for r in area.regions if r.type == "WINDOW"), None)
    space = area.spaces.active
    if region is None or space is None or space.region_3d is None:
        return None
    return area, region, space


def capture_viewport(
    context: bpy.types.Context, max_side: int = VIEWPORT_MAX_SIDE
) -> tuple[bytes, str]:
    """(PNG bytes, what they are) of the 3D viewport ("viewport image"), or of a camera
    snapshot ("camera snapshot") where the viewport cannot be drawn (background mode, no 3D
    view). CaptureError says why nothing came out."""
    view = None if bpy.app.background else find_view3d(context)
    if view is None:
        return render_camera_snapshot(context.scene), "camera snapshot"
    _area, region, space = view
    return draw_viewport(context, region, space, max_side), "viewport image"


def draw_viewport(context, region, space, max_side: int = VIEWPORT_MAX_SIDE) -> bytes:
    # Found here, not by the service after a round trip.
    _refuse_thin(region.width, region.height, "the 3D viewport", "make it wider or taller")
    import gpu

    width, height = _scaled(region.width, region.height, max_side)
    try:
        offscreen = gpu.types.GPUOffScreen(width, height)
    except Exception as exc:  # no GPU context, out of memory
        raise CaptureError(f"could not draw the viewport offscreen ({exc})") from None
    # The character, not the grid, the bones drawn in front or the selection outline: the
    # model learnt from renders without them. The user's setting comes back after.
    overlay = getattr(space, "overlay", None)
    overlays_shown = overlay is not None and overlay.show_overlays
    try:
        if overlays_shown:
            overlay.show_overlays = False
        # draw_view3d binds the offscreen itself (as in Blender's GPUOffScreen example); the
        # pixels stay in its color texture and are read back through its framebuffer.
        offscreen.draw_view3d(
            context.scene,
            context.view_layer,
            space,
            region,
            space.region_3d.view_matrix,
            space.region_3d.window_matrix,
            do_color_management=True,
        )
        with offscreen.bind():
            framebuffer = gpu.state.active_framebuffer_get()
            buffer = framebuffer.read_color(0, 0, width, height, 4, 0, "UBYTE")
    finally:
        if overlays_shown:
            overlay.show_overlays = True
        offscreen.free()
    buffer.dimensions = width * height * 4
    pixels = _buffer_array(buffer).reshape(height, width, 4).copy()
    if shows_nothing(pixels):  # a pose guessed from it would be noise
        raise CaptureError(
            "the 3D viewport shows nothing but its background: bring the character into view "
            "(its mesh: the snapshot leaves overlays out, so an armature's bones alone do not "
            "show)"
        )
    _refuse_off_centre(pixels, "the 3D viewport")
    pixels[..., 3] = 255  # the service sees RGB; an opaque PNG avoids surprises
    return encode_png(pixels, flip_vertical=True)


def _buffer_array(buffer) -> np.ndarray:
    """A ``gpu.types.Buffer`` of bytes as a numpy array (through the buffer protocol where the
    Blender version has it, else element by element)."""
    try:
        return np.frombuffer(memoryview(buffer), dtype=np.uint8).copy()
    except TypeError:
        return np.array(buffer.to_list(), dtype=np.uint8)


def _png_pixels(path: str) -> np.ndarray:
    """The (H, W, 4) pixels, 0-255, of the PNG file at ``path``, read by Blender."""
    image = bpy.data.images.load(path, check_existing=False)
    try:
        width, height = image.size
        values = np.empty(width * height * image.channels, dtype=np.float32)
        image.pixels.foreach_get(values)
        return (values.reshape(height, width, image.channels) * 255.0).round()
    finally:
        bpy.data.images.remove(image)


# Compositing and the sequencer are off for the snapshot: a compositor's File Output node would
# write the user's output files with it.
# Border and multiview are off as well: a border would send part of the frame, and stereo
# writes its views to other file names. So are a transparent film and Burn Into Image.
_RENDER_SETTINGS = (
    "engine",
    "film_transparent",
    "use_stamp",
    "resolution_x",
    "resolution_y",
    "resolution_percentage",
    "pixel_aspect_x",
    "pixel_aspect_y",
    "filepath",
    "use_compositing",
    "use_sequencer",
    "use_border",
    "use_multiview",
)
# media_type (Blender 5.0+) first: it limits file_format to its own formats (a video output
# takes only FFMPEG), so it is set to IMAGE before PNG, and put back before the format.
_IMAGE_SETTINGS = ("media_type", "file_format", "color_mode", "color_depth")


def _refuse_off_centre(pixels: np.ndarray, what: str) -> None:
    """CaptureError for a picture whose character lies outside its middle square, all the
    model sees of it (``core.images.centre_square``)."""
    if shows_nothing(centre_square(pixels)):
        raise CaptureError(
            f"the character is outside the middle of {what}: the model sees only its middle "
            "square (its shorter side's size); bring the character to the middle"
        )


def _refuse_thin(width: int, height: int, what: str, remedy: str) -> None:
    """CaptureError for a picture whose long side is more than ``MAX_IMAGE_ASPECT_RATIO``
    times its short side, which the service refuses."""
    if max(width, height) > MAX_IMAGE_ASPECT_RATIO * min(width, height):
        raise CaptureError(
            f"{what} is {width} x {height} pixels, its long side more than "
            f"{MAX_IMAGE_ASPECT_RATIO} times its short side; the service takes no such picture"
            + (f": {remedy}" if remedy else "")
        )


def render_running() -> bool:
    """Whether a render (F12, or an animation) is running in this Blender."""
    return bpy.app.is_job_running("RENDER")


def render_camera_snapshot(scene: bpy.types.Scene, max_side: int = SNAPSHOT_MAX_SIDE) -> bytes:
    """PNG bytes of the scene camera's view, rendered with Workbench at most ``max_side`` px on
    the long side (the scene's aspect ratio), without compositing; the scene's settings are put
    back afterwards. Like any render, it replaces the Render Result."""
    if scene.camera is None:
        raise CaptureError(
            "the scene has no camera to take a picture with (no 3D viewport can be drawn "
            "here: background mode, or none in this window): add a camera, or use Pose from "
            "Image"
        )
    if render_running():  # the snapshot's settings would go into the user's render
        raise CaptureError("a render is running: take the snapshot when it has finished")
    render = scene.render
    settings = render.image_settings
    saved = {name: getattr(render, name) for name in _RENDER_SETTINGS}
    saved_image = {
        name: getattr(settings, name) for name in _IMAGE_SETTINGS if hasattr(settings, name)
    }
    # Setting file_format back to OPEN_EXR resets its colour space (ACEScg -> Linear Rec.709).
    linear = getattr(settings, "linear_colorspace_settings", None)
    saved_linear = linear.name if linear is not None else None
    # The frame's shape as the camera shows it, not its size: a render at 1 % of 1920 x 1080 is
    # still sent at max_side, and non-square pixels (anamorphic work) become square ones, as the
    # service reads them (kept, the body came out stretched).
    shown_x = render.resolution_x * render.pixel_aspect_x
    shown_y = render.resolution_y * render.pixel_aspect_y
    _refuse_thin(round(shown_x), round(shown_y), "the camera's frame", "")
    scale = max_side / max(shown_x, shown_y)
    width = max(1, round(shown_x * scale))
    height = max(1, round(shown_y * scale))
    with tempfile.TemporaryDirectory(prefix="chatpose-snapshot-") as folder:
        path = os.path.join(folder, "snapshot.png")
        try:
            render.engine = "BLENDER_WORKBENCH"
            render.resolution_x, render.resolution_y = width, height
            render.resolution_percentage = 100
            render.pixel_aspect_x = render.pixel_aspect_y = 1.0
            render.filepath = path
            render.use_compositing = render.use_sequencer = False
            render.use_border = render.use_multiview = False
            # Neither a transparent film (black in an RGB file) nor Burn Into Image's text.
            render.film_transparent = render.use_stamp = False
            if "media_type" in saved_image:  # Blender 5.0+
                settings.media_type = "IMAGE"
            settings.file_format = "PNG"
            settings.color_mode = "RGB"
            settings.color_depth = "8"
            try:
                bpy.ops.render.render(write_still=True, scene=scene.name)
            except RuntimeError as exc:
                raise CaptureError(f"the snapshot render failed ({exc})") from None
            try:
                with open(path, "rb") as file:
                    data = file.read()
            except OSError:
                raise CaptureError("the snapshot render wrote no image") from None
            pixels = _png_pixels(path)
            if shows_nothing(pixels):  # a pose guessed from it would be noise
                raise CaptureError(
                    "the scene camera sees nothing but the background: point it at the "
                    "character, and check that the view layer and the character render"
                )
            _refuse_off_centre(pixels, "the camera's frame")
            return data
        finally:
            for name, value in saved_image.items():
                setattr(settings, name, value)
            if saved_linear and linear.name != saved_linear:  # "" when the format has none
                linear.name = saved_linear
            for name, value in saved.items():
                setattr(render, name, value)
