"""Operators: create the SMPL armature, apply a pose, rest pose, import/export .npz."""

from __future__ import annotations

import json
from pathlib import Path

import bpy
from bpy_extras.io_utils import ExportHelper, ImportHelper

from shared_protocol.pose import FPS_RANGE, Motion, Pose, written_z_up

from ..core.timeline import (
    MAX_FRAME,
    MAX_IMPORTED_POSES,
    frames_for,
    keeps_timing,
    pace,
    same_rate,
)
from ..core.wording import quoted
from ..preferences import preferred_smpl_model
from . import live
from .anim import LockedCurveError, action_fcurves, muted_note, start_new_take
from .armature import (
    create_smpl_armature,
    ensure_object_mode,
    find_smpl_armature,
    linked_problem,
)
from .batch_store import load_record
from .keyframes import export_npz, import_npz, placement_left_out, scene_fps
from .posing import apply_pose, auto_key_options, pose_channels
from .props import checked_target, selection_problem, target_armature
from .runtime import POSING_MODES, mode_name
from .sending import read_batch_lines


def _report_modes(op: bpy.types.Operator, bones: list[str]) -> None:
    if bones:
        op.report(
            {"INFO"},
            f"{len(bones)} bone(s) not in Quaternion mode got their rotation converted to "
            f"their own mode: {', '.join(bones[:4])}{' ...' if len(bones) > 4 else ''}",
        )


class CHATPOSE_OT_create_armature(bpy.types.Operator):  # noqa: N801
    """Add an SMPL armature (24 bones named as SMPL's joints) with a mesh at the 3D cursor"""

    bl_idname = "chatpose.create_armature"
    bl_label = "Create SMPL Armature"
    bl_options = {"REGISTER", "UNDO"}

    name: bpy.props.StringProperty(name="Name", default="SMPL")
    with_mesh: bpy.props.BoolProperty(
        name="Mesh", description="Add a mesh skinned to the bones", default=True
    )
    on_ground: bpy.props.BoolProperty(
        name="On Ground",
        description="Lift the armature so the feet stand on the cursor",
        default=True,
    )
    use_model_file: bpy.props.BoolProperty(
        name="Use SMPL Model File",
        description="Take rest joints and body mesh from the model file set in the add-on "
        "preferences (when one is set)",
        default=True,
    )

    def execute(self, context):
        try:
            model = preferred_smpl_model(context) if self.use_model_file else None
        except ValueError as exc:
            self.report({"ERROR"}, str(exc))
            return {"CANCELLED"}
        obj = create_smpl_armature(
            context,
            name=self.name or "SMPL",
            location=tuple(context.scene.cursor.location),
            on_ground=self.on_ground,
            with_mesh=self.with_mesh,
            model=model,
        )
        source = "the SMPL model file" if model is not None else "the built-in skeleton"
        self.report({"INFO"}, f"Created {obj.name} from {source}")
        return {"FINISHED"}


def mode_problem(mode: str) -> str | None:
    """Why poses cannot go on in ``mode`` (an Edit or paint mode), or None."""
    if mode in POSING_MODES:
        return None
    return f"Leave {mode_name(mode)} Mode first (poses go on in Object or Pose Mode)"


class _NeedsArmature:
    @classmethod
    def poll(cls, context):
        if find_smpl_armature(context) is None:
            cls.poll_message_set("Select an SMPL armature (or create one)")
            return False
        problem = mode_problem(context.mode)
        if problem is not None:
            cls.poll_message_set(problem)
        return problem is None


class _ChangesArmature(_NeedsArmature):
    """Not for an armature linked from a library: what is put on it is not saved (reading it,
    as export does, is fine)."""

    @classmethod
    def poll(cls, context):
        if not super().poll(context):
            return False
        problem = linked_problem(find_smpl_armature(context))
        if problem is not None:
            cls.poll_message_set(problem)
        return problem is None


class CHATPOSE_OT_apply_pose(_ChangesArmature, bpy.types.Operator):  # noqa: N801
    """Put an SMPL pose (shared_protocol Pose JSON) on the SMPL armature, as one undo step"""

    bl_idname = "chatpose.apply_pose"
    bl_label = "Apply Pose"
    bl_options = {"REGISTER", "UNDO"}

    pose_json: bpy.props.StringProperty(
        name="Pose", description="Pose.to_dict() as JSON", options={"HIDDEN", "SKIP_SAVE"}
    )
    use_translation: bpy.props.BoolProperty(
        name="Translation",
        description="Set the root bone's location from the pose",
        default=True,
    )
    insert_keyframe: bpy.props.BoolProperty(name="Insert Keyframe", default=False)
    frame: bpy.props.IntProperty(
        name="Frame", description="Frame to key (default: the current frame)", default=1
    )

    def execute(self, context):
        try:
            pose = Pose.from_dict(json.loads(self.pose_json))
        except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
            self.report({"ERROR"}, f"Not a pose: {exc}")
            return {"CANCELLED"}
        obj = find_smpl_armature(context)
        frame = None
        if self.insert_keyframe:
            is_set = self.properties.is_property_set("frame")
            frame = self.frame if is_set else context.scene.frame_current
        try:
            result = apply_pose(obj, pose, use_translation=self.use_translation, frame=frame)
        except LockedCurveError as exc:  # nothing changed
            self.report({"ERROR"}, f"Not applied: {exc}")
            return {"CANCELLED"}
        _report_modes(self, result.non_quaternion_bones)
        return {"FINISHED"}


class CHATPOSE_OT_rest_pose(bpy.types.Operator):  # noqa: N801
    """Put the target armature's SMPL bones in their rest pose: no rotation, at their rest
    places and sizes, the root where it is; keyed at the current frame while Auto Keying is on"""

    bl_idname = "chatpose.rest_pose"
    bl_label = "Rest Pose"
    bl_options = {"REGISTER", "UNDO"}

    @classmethod
    def poll(cls, context):
        _, problem = checked_target(context)  # the panel's Target, as an answer goes there
        problem = problem or mode_problem(context.mode)
        if problem:
            cls.poll_message_set(problem)
        return not problem

    def execute(self, context):
        import numpy as np

        obj, rest = target_armature(context), Pose(np.zeros((24, 3)))
        auto_key = context.scene.tool_settings.use_keyframe_insert_auto
        frame = context.scene.frame_current if auto_key else None
        try:  # keyed as Blender's own Alt+R keys under Auto Keying
            options = auto_key_options(context)
            result = apply_pose(obj, rest, use_translation=False, frame=frame, key_options=options)
        except LockedCurveError as exc:  # posed as Auto Keying poses it: unkeyed
            result = apply_pose(obj, rest, use_translation=False)
            self.report({"WARNING"}, f"Rest pose not keyed: {exc}")
        _report_modes(self, result.non_quaternion_bones)
        return {"FINISHED"}


class CHATPOSE_OT_import_npz(bpy.types.Operator, ImportHelper):  # noqa: N801
    """Key an AMASS-layout .npz motion on the SMPL armature (a new one if none is selected)"""

    bl_idname = "chatpose.import_npz"
    bl_label = "Import SMPL Motion (.npz)"
    bl_options = {"REGISTER", "UNDO", "PRESET"}

    filename_ext = ".npz"
    filter_glob: bpy.props.StringProperty(default="*.npz", options={"HIDDEN"})
    start_frame: bpy.props.IntProperty(  # as a scene range
        name="Start Frame", default=1, min=0, max=MAX_FRAME
    )
    frame_step: bpy.props.IntProperty(
        name="Frame Step", description="Frames between two poses", default=1, min=1
    )
    use_translation: bpy.props.BoolProperty(name="Translation", default=True)
    set_scene: bpy.props.BoolProperty(
        name="Set Scene Rate and Range",
        description="Set the scene's frame rate (unless resampled) and range to the motion",
        default=True,
    )
    resample: bpy.props.BoolProperty(
        name="Resample to Scene Rate",
        description="Key the motion at the scene's frame rate (a key every Frame Step frames), "
        "its poses interpolated between the file's, so that it plays at its own speed in the "
        "scene's rate (a 120 fps capture in a 24 fps shot). Off: a key for each frame of the "
        "file",
        default=False,
    )
    z_up: bpy.props.BoolProperty(
        name="Z-up (AMASS)",
        description="The file is Z-up, as AMASS's motions are; off: in SMPL's own frame, +Y up. "
        "A file exported here says which, and is read so",
        default=True,
    )
    new_take: bpy.props.BoolProperty(
        name="New Take",
        description="Key the motion into a new action named after the file; the armature's "
        "animation stays in its own action (kept when the file is saved). Off: key into the "
        "current action, replacing its keys where frames meet",
        default=True,
    )

    def _resampled_rate(self, scene_rate: float, poses: int) -> float | None:
        """The rate to resample the motion to (None: not resampled; a single pose has no
        rate); ValueError for one no motion file holds, before the scene is changed."""
        if not self.resample or poses < 2:
            return None
        rate = scene_rate / self.frame_step
        low, high = FPS_RANGE
        if not low <= rate <= high:
            raise ValueError(
                f"Resample to Scene Rate: the scene's {scene_rate:.5g} fps, a key every "
                f"{self.frame_step} frames, is {rate:.5g} fps; a motion's rate is from {low:g} "
                f"to {high:g} fps: change the Frame Step"
            )
        return rate

    def _refusal(self, context, obj: bpy.types.Object | None) -> str | None:
        """Why the motion may not be imported onto `obj` (None: a new rig), or None."""
        if obj is None and (problem := selection_problem(context.active_object)):
            # Not a new SMPL rig beside the one the user meant: say why theirs is not one.
            return f"{problem}. Select an SMPL armature, or nothing to import onto a new one"
        if obj is not None and (problem := linked_problem(obj)) is not None:
            return problem
        run = live.current_batch() if live.batch_running() else None
        if obj is not None and not self.new_take and run is not None:
            if run.armature_uid == obj.session_uid:  # its keys and the run's would mix
                return f"a batch is keying {obj.name}'s take; cancel it, or import as a New Take"
        return None

    def _timing(
        self, scene, frames, file_fps: float, resample_to: float | None, rate_before: float,
        keyed_before: bool,
    ) -> tuple[str, bool]:  # fmt: skip
        """What the report says of the motion's rate and the scene's range, and whether that
        is a warning: a motion that will not play at its own speed, or out of sight."""
        rate = scene_fps(scene)
        timing, warn = "", False
        if resample_to is not None and not same_rate(file_fps, resample_to):
            timing = f"; resampled from {file_fps:.5g} to {resample_to:.5g} fps"
        playback = file_fps * self.frame_step
        if not (self.set_scene or resample_to or len(frames) < 2 or same_rate(playback, rate)):
            timing += (
                f"; the file is at {file_fps:.5g} fps and the scene plays {rate:.5g}: a key for "
                f"each of its frames plays it {pace(playback, rate)} (Resample to Scene Rate "
                "keys it at the scene's rate)"
            )
            warn = True
        if keyed_before and not self.new_take and not same_rate(rate, rate_before):
            timing += (
                f"; the scene's rate went from {rate_before:.5g} to {rate:.5g} fps, and the "
                "take's other keys play at it too (Resample to Scene Rate keeps the scene's rate)"
            )
            warn = True
        if self.set_scene and len(frames) > 1:
            timing += (
                f"; the scene now plays frames {scene.frame_start}-{scene.frame_end} at "
                f"{rate:g} fps"
            )
            preview = (scene.frame_preview_start, scene.frame_preview_end)
            if scene.use_preview_range and not preview[0] <= frames[0] <= frames[-1] <= preview[1]:
                timing += (
                    f", but its preview range ({preview[0]}-{preview[1]}) is on and plays "
                    "instead: turn it off in the Timeline to see the motion"
                )
                warn = True
        return timing, warn

    def execute(self, context):
        obj = find_smpl_armature(context)
        if (refusal := self._refusal(context, obj)) is not None:
            self.report({"ERROR"}, f"Not imported: {refusal}")
            return {"CANCELLED"}
        unused_model = ""
        kept = None
        rate_before = scene_fps(context.scene)
        keyed_before = obj is not None and bool(action_fcurves(obj))
        try:
            # Read first: a file that does not load leaves the scene as it was, nor one too long.
            motion = Motion.load_npz(self.filepath, z_up=self.z_up)
            said_z_up = written_z_up(self.filepath)
            file_fps = motion.fps
            if len(motion) == 0:  # a new take of nothing would replace what plays now
                raise ValueError(f"{self.filepath}: the motion holds no frames")
            resample_to = self._resampled_rate(rate_before, len(motion))
            count = len(motion) if resample_to is None else motion.resampled_length(resample_to)
            if count > MAX_IMPORTED_POSES:
                raise ValueError(
                    f"{self.filepath}: {count:,} poses to key, more than the "
                    f"{MAX_IMPORTED_POSES:,} one import keys (Blender would stop for minutes "
                    "and could run out of memory): cut the file, or Resample to Scene Rate at a "
                    "lower rate"
                )
            frames_for(count, self.start_frame, self.frame_step)
            if context.mode == "EDIT_ARMATURE":  # its bones are not the ones posing reads
                ensure_object_mode(context)
            if obj is None:
                try:
                    model = preferred_smpl_model(context)
                except ValueError as exc:  # the motion still imports, on the mannequin
                    model, unused_model = None, f" (the SMPL model file was not used: {exc})"
                cursor = tuple(context.scene.cursor.location)  # as Create SMPL Armature
                obj = create_smpl_armature(context, model=model, location=cursor)
            elif self.new_take:
                kept = start_new_take(obj, Path(self.filepath).stem)
            motion, frames = import_npz(
                obj,
                self.filepath,
                start=self.start_frame,
                step=self.frame_step,
                use_translation=self.use_translation,
                scene=context.scene if self.set_scene else None,
                z_up=self.z_up,
                resample_fps=resample_to,
            )
        except FileNotFoundError:
            self.report({"ERROR"}, f"Not imported: {self.filepath}: no such file")
            return {"CANCELLED"}
        except ValueError as exc:
            self.report({"ERROR"}, str(exc))
            return {"CANCELLED"}
        frame = ""
        if said_z_up is not None and said_z_up != self.z_up:  # exported here with the other
            written = "Z-up (AMASS)" if said_z_up else "in SMPL's frame, +Y up (Z-up off)"
            frame = f"; the file says it was written {written}, and was read so"
        earlier = f"; its earlier animation is kept in the action {quoted(kept)}" if kept else ""
        timing, warn = self._timing(
            context.scene, frames, file_fps, resample_to, rate_before, keyed_before
        )
        muted = muted_note(obj, pose_channels(obj, self.use_translation))
        if muted:
            timing, warn = f"{timing}; {muted}", True
        level = "WARNING" if warn or unused_model else "INFO"
        self.report(
            {level},
            f"Keyed {len(frames)} poses on {obj.name}{frame}{timing}{earlier}{unused_model}",
        )
        return {"FINISHED"}


class CHATPOSE_OT_export_npz(_NeedsArmature, bpy.types.Operator, ExportHelper):  # noqa: N801
    """Write the SMPL armature's keyed frames (or its current pose) as an AMASS-layout .npz"""

    bl_idname = "chatpose.export_npz"
    bl_label = "Export SMPL Motion (.npz)"
    bl_options = {"REGISTER"}

    filename_ext = ".npz"
    filter_glob: bpy.props.StringProperty(default="*.npz", options={"HIDDEN"})
    z_up: bpy.props.BoolProperty(
        name="Z-up (AMASS)",
        description="Write the motion Z-up, as AMASS's motions are; off: in SMPL's own frame",
        default=True,
    )

    def execute(self, context):
        obj = find_smpl_armature(context)
        labels = _batch_labels(context, obj)
        try:
            motion, frames = export_npz(
                obj, self.filepath, scene_fps(context.scene), z_up=self.z_up, labels=labels
            )
        except (OSError, ValueError) as exc:
            why = _write_problem(exc, self.filepath)
            self.report({"ERROR"}, f"Could not write {self.filepath}: {why}")
            return {"CANCELLED"}
        labelled = sum(bool(label) for label in motion.labels or ())
        said = f", {labelled} labelled with their batch line's prompt" if labelled else ""
        warnings = []
        if not keeps_timing(frames):
            warnings.append(
                "the keys alone, one after the other at the scene's rate, so the time between "
                f"them is not kept (keys from frame {frames[0]} to {frames[-1]}, too far apart "
                "to read every frame between them)"
            )
        left_out = placement_left_out(obj)
        if left_out:
            warnings.append(
                f"the armature's own motion only: {left_out}, which the file leaves out (it "
                "holds the bones, in the armature object's space)"
            )
        written = f"Wrote {len(motion)} frame(s) to {self.filepath}{said}"
        if warnings:
            self.report({"WARNING"}, f"{written}: {'; and '.join(warnings)}")
        else:
            self.report({"INFO"}, written)
        return {"FINISHED"}


def _write_problem(exc: Exception, path: str) -> str:
    """Why a file could not be written at ``path``, said of the folder the user chose: the
    error itself names a temporary file beside it."""
    folder = Path(path).absolute().parent
    try:
        if not folder.exists():
            return f"the folder {folder} does not exist"
        if not folder.is_dir():
            return f"{folder} is a file, not a folder"
    except OSError:  # a name too long to look up: what the error says is all there is
        pass
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)


def _batch_labels(context: bpy.types.Context, obj: bpy.types.Object) -> dict[int, str]:
    """The prompts of the batch lines keyed on ``obj``, by frame, as the scene's batch text
    holds them now (as ``chatpose batch --out`` labels its frames); none without a batch."""
    try:
        numbered, _ = read_batch_lines(context)
        return load_record(obj).labels([text for _, text in numbered])
    except (live.UserError, ValueError):  # no batch text, or a damaged record: no labels
        return {}


CLASSES = (
    CHATPOSE_OT_create_armature,
    CHATPOSE_OT_apply_pose,
    CHATPOSE_OT_rest_pose,
    CHATPOSE_OT_import_npz,
    CHATPOSE_OT_export_npz,
)
