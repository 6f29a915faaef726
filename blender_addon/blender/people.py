"""Putting every pose of one answer on an armature: the first on the target, each further one on
its own SMPL armature beside it (see ``core.placement``)."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

import bpy
import numpy as np
from mathutils import Matrix

from shared_protocol.pose import Pose

from ..core.placement import DEFAULT_SPACING_M, extra_person_name, person_location
from ..core.wording import quoted
from ..preferences import preferred_smpl_model
from .anim import LockedCurveError, muted_note, refuse_locked
from .armature import (
    armature_units,
    create_smpl_armature,
    is_smpl_armature,
    linked_problem,
    rest_joints,
    upright,
)
from .meshes import MANNEQUIN, SMPL_BODY, body_name
from .posing import apply_pose, overridden_bones, placed_on_floor, pose_channels, root_places

# A target's people are found by their names ("SMPL.person2"). Copied together (a scene's Full
# Copy, an Append, Shift+D), Blender names both anew, each on its own ("SMPL.002",
# "SMPL.person2.001"); these properties find the copy's people then: a target's id, and its
# person's target id and pose. A string, not a pointer, which would keep a deleted target in the
# file; a copy shares it with the original, and is told apart by scene and by name.
TARGET_ID = "chatpose_target_id"
PERSON_OF = "chatpose_person_of"
PERSON_INDEX = "chatpose_person_index"


@dataclass
class PeopleResult:
    armatures: list[str] = field(default_factory=list)  # where each pose went, in order
    created: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # names taken by something else
    non_quaternion_bones: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # for the user, e.g. a model file not used
    keyed_frame: int | None = None  # where keys went in; None: none did


@contextlib.contextmanager
def _kept_selection(context: bpy.types.Context):
    """Restores the active object, the selection and the mode after creating objects."""
    view_layer = context.view_layer
    active = view_layer.objects.active
    # The objects, not their names (a linked one may share a local one's), and only those
    # selected, not every object of a set of thousands.
    selected = set(context.selected_objects)
    mode = context.mode
    try:
        yield
    finally:
        for obj in context.selected_objects:
            if obj not in selected:
                obj.select_set(False)
        for obj in selected:
            with contextlib.suppress(ReferenceError, RuntimeError):  # deleted meanwhile
                obj.select_set(True)
        if active is None:  # creating made the new object active
            view_layer.objects.active = None
        elif active.name in view_layer.objects:
            view_layer.objects.active = active
            # Each switch updates the whole view layer: only when it was left.
            if mode == "POSE" and context.mode != "POSE" and active.type == "ARMATURE":
                with contextlib.suppress(RuntimeError):
                    bpy.ops.object.mode_set(mode="POSE")


def _update_where(obj: bpy.types.Object) -> None:
    """``obj.matrix_world`` as it stands: a view layer of one of its scenes updated (the
    window's may not hold it)."""
    for scene in obj.users_scene:
        for layer in scene.view_layers:
            if obj.name in layer.objects:
                layer.update()
                return


def person_armature(
    context: bpy.types.Context,
    target: bpy.types.Object,
    k: int,
    spacing: float,
    notes: list[str] | None = None,
    made: bpy.types.Object | None = None,
) -> tuple[bpy.types.Object | None, bool]:
    """(armature for pose k, created?); None when the name is taken by a non-SMPL object.
    What the user should know (a model file that could not be used) is added to ``notes``.
    ``made``: a person already created for ``target`` in this answer, copied rather than
    built again."""
    name = extra_person_name(target.name, k)
    obj = bpy.data.objects.get(name) or _copied_with(target, k)
    if obj is not None:
        return _existing_person(obj, target, notes), False
    # Spacing is in the character's metres: a rig in centimetres (100 units a metre, at
    # scale 1) put the next person 1 cm away, inside the first.
    spacing *= armature_units(target) * abs(target.matrix_world.to_scale().x)  # mirrored: < 0
    location = person_location(target.matrix_world.translation, k, spacing)
    if made is not None:
        obj = _copy_person(made, name)
        obj.location = location
    else:
        obj = _new_person(context, target, name, location, notes)
    _move_beside(obj, target)
    _mark_person(obj, target, k)
    return obj, True


def _existing_person(
    obj: bpy.types.Object, target: bpy.types.Object, notes: list[str] | None
) -> bpy.types.Object | None:
    """The person ``obj`` made earlier for ``target``, back in the target's scenes; None when it
    is not an SMPL armature, or a linked one (posed, it would lose the pose on saving)."""
    if not is_smpl_armature(obj):
        return None
    problem = linked_problem(obj)
    if problem is not None:
        if notes is not None:
            notes.append(problem)
        return None
    # Where the user put it, hidden or not; out of the target's scenes, back beside it, with
    # its body (a bare skeleton, its body left out, looked lost): nothing else of the user's
    # parented to it.
    if not _in_scenes_of(obj, target):
        for item in (obj, *(c for c in obj.children if _is_body_of(c, obj))):
            if not _in_scenes_of(item, target):
                for collection in _collections_beside(target):
                    if item.name not in collection.objects:
                        collection.objects.link(item)
    return obj


def _new_person(
    context: bpy.types.Context,
    target: bpy.types.Object,
    name: str,
    location,
    notes: list[str] | None,
) -> bpy.types.Object:
    """A new armature named ``name`` at ``location`` with the target's skeleton, facing as it
    faces, with the SMPL body when the preferred model fits its bones, else the mannequin."""
    skeleton = rest_joints(target)
    try:
        model = preferred_smpl_model()
    except ValueError as exc:  # the mannequin will do; the answer's message says why
        model, note = None, f"the SMPL model file was not used ({exc})"
        if notes is not None and note not in notes:
            notes.append(note)
    if model is not None and not np.allclose(model.rest_joints, skeleton, atol=1e-4):
        model = None  # its body would not fit the target's bones: the mannequin does
    with _kept_selection(context):
        obj = create_smpl_armature(
            context,
            name=name,
            rest_joints_smpl=skeleton,
            location=location,
            on_ground=False,
            with_mesh=True,
            model=model,
            keep_pose_mode=True,
        )
    # Facing as the target faces, whatever its rotation mode; without the turn that stands a
    # rig with Y-up armature data upright (an imported SMPL FBX): this one is Z-up already.
    # Its skeleton is the target's in metres: a rig built in centimetres shows at 1/100 scale.
    world = target.matrix_world
    stands = Matrix(upright(target).T.tolist()).to_quaternion()
    obj.matrix_world = Matrix.LocRotScale(
        obj.location, world.to_quaternion() @ stands, world.to_scale() * armature_units(target)
    )
    return obj


def _mark_person(obj: bpy.types.Object, target: bpy.types.Object, k: int) -> None:
    if TARGET_ID not in target:
        target[TARGET_ID] = uuid.uuid4().hex
    obj[PERSON_OF], obj[PERSON_INDEX] = target[TARGET_ID], k


def _copied_with(target: bpy.types.Object, k: int) -> bpy.types.Object | None:
    """The person for pose ``k`` that Blender copied with a copied target under a name of its
    own: the one made for the target's id, in the target's scenes, and not another target's of
    that id by name (the original's, in the same scene after Shift+D); None for none, or when
    there are several (a duplicate kept aside as well): a new one is made, as before copies
    were found."""
    target_id = target.get(TARGET_ID)
    if target_id is None:
        return None
    owners = [o for o in bpy.data.objects if o.get(TARGET_ID) == target_id and o != target]
    named = {extra_person_name(owner.name, k) for owner in owners}
    found = [
        obj
        for obj in bpy.data.objects
        if obj.get(PERSON_OF) == target_id and obj.get(PERSON_INDEX) == k and obj.name not in named
    ]
    found = [obj for obj in found if _in_scenes_of(obj, target)]
    return found[0] if len(found) == 1 else None


def _copy_person(made: bpy.types.Object, name: str) -> bpy.types.Object:
    """A copy of a person created for the same answer, its armature and mesh data its own and
    without animation. Building one switches to edit mode and back, and each switch updates
    the whole view layer: a second and third person in a large scene took seconds each."""
    obj = made.copy()
    obj.data = made.data.copy()
    obj.name = obj.data.name = name
    obj.animation_data_clear()  # `made` is posed and perhaps keyed already
    for child in made.children:
        mesh = child.copy()
        mesh.data = child.data.copy()
        kind = next(
            (k for k in (MANNEQUIN, SMPL_BODY) if child.name == body_name(made.name, k)), None
        )
        mesh.name = mesh.data.name = (
            body_name(name, kind) if kind else child.name.replace(made.name, name, 1)
        )
        mesh.parent = obj
        for modifier in mesh.modifiers:
            if modifier.type == "ARMATURE":
                modifier.object = obj
    return obj


def _collections_beside(target: bpy.types.Object) -> list[bpy.types.Collection]:
    """The target's collections that can take an object: not one linked from a library or
    overridden (Blender refuses to link into those); its scene's own collection if none can."""
    local = [c for c in target.users_collection if c.library is None and c.override_library is None]
    if local:
        return local
    return [scene.collection for scene in target.users_scene[:1]]


def _in_scenes_of(obj: bpy.types.Object, target: bpy.types.Object) -> bool:
    return any(obj.name in scene.objects for scene in target.users_scene)


def _is_body_of(child: bpy.types.Object, armature: bpy.types.Object) -> bool:
    """Whether ``child`` is a mesh ``armature`` deforms (its mannequin or SMPL body)."""
    modifiers = getattr(child, "modifiers", ())
    return any(m.type == "ARMATURE" and m.object == armature for m in modifiers)


def _move_beside(obj: bpy.types.Object, target: bpy.types.Object) -> None:
    """Moves a new person (and its mesh) from the collection it was made in to the target's
    collections: the user may be looking at another scene when the answer arrives."""
    wanted = _collections_beside(target)
    for item in (obj, *obj.children):
        for collection in wanted:
            if item.name not in collection.objects:
                collection.objects.link(item)
        for collection in list(item.users_collection):
            if collection not in wanted:
                collection.objects.unlink(item)


def refuse_locked_people(target: bpy.types.Object, count: int, use_translation: bool) -> None:
    """LockedCurveError when a channel an answer of ``count`` people would key is locked on
    ``target`` or on a person of it already there: all of them or none, checked first."""
    names = [extra_person_name(target.name, k) for k in range(1, count)]
    people = [o for o in map(bpy.data.objects.get, names) if o and is_smpl_armature(o)]
    refuse_locked(target, pose_channels(target, use_translation))
    for obj in people:
        if linked_problem(obj) is not None:
            continue  # not posed at all: `person_armature` leaves it, saying why
        try:
            refuse_locked(obj, pose_channels(obj, use_translation))
        except LockedCurveError as exc:
            raise LockedCurveError(f"{obj.name}: {exc}") from None


def _location_locked(obj: bpy.types.Object) -> str | None:
    """Why the root's location of ``obj`` cannot be keyed (its rotations can: checked
    before), or None."""
    try:
        refuse_locked(obj, pose_channels(obj, True))
    except LockedCurveError as exc:
        return str(exc)
    return None


def apply_people(
    context: bpy.types.Context,
    target: bpy.types.Object,
    poses: Sequence[Pose],
    *,
    frame: int | None = None,
    use_translation: bool = True,
    on_floor: bool = False,
    spacing: float = DEFAULT_SPACING_M,
    key_options: frozenset[str] = frozenset(),
) -> PeopleResult:
    """Pose 0 on ``target``, pose k on ``<target>.person<k+1>`` (made on demand); each keyed at
    ``frame`` when given. With ``on_floor`` each is placed on its armature's floor where that
    armature's root stands (``posing.placed_on_floor``; with ``use_translation`` a pose's own
    translation is kept), but for one whose root location is locked, which is keyed without
    it (a note says so). LockedCurveError, before any of them changes, when another channel to
    key is locked on any of them."""
    own = use_translation and any(p.translation is not None for p in poses)
    if frame is not None:
        refuse_locked_people(target, len(poses), own)
    result = PeopleResult()
    made = None  # the first person this answer creates; the others are copies of it
    if len(poses) > 1:  # people stand beside the target as it is now: a script may have moved
        _update_where(target)  # it since Blender last drew (milliseconds when it did)
    for k, pose in enumerate(poses):
        if k == 0:
            obj = target
        else:
            obj, created = person_armature(context, target, k, spacing, result.notes, made)
            if obj is None:
                result.skipped.append(extra_person_name(target.name, k))
                continue
            if created:
                result.created.append(obj.name)
                made = made or obj
        floor = on_floor and not (use_translation and pose.translation is not None)
        if floor and frame is not None and (locked := _location_locked(obj)):
            floor = False
            result.notes.append(
                f"{quoted(obj.name)} not put on the floor (Keep on Floor): {locked}"
            )
        if floor:
            places = root_places(obj, None if frame is None else [frame])
            (pose,) = placed_on_floor(obj, [pose], places)
        applied = apply_pose(
            obj, pose, use_translation=own or floor, frame=frame, key_options=key_options
        )
        if applied.keyed_frame is not None:
            result.keyed_frame = applied.keyed_frame
        result.armatures.append(obj.name)
        keyed = applied.keyed_frame is not None  # not under Auto Keying's Replace mode, say
        if keyed and (muted := muted_note(obj, pose_channels(obj, own or floor))):
            result.notes.append(muted)
        if overridden := overridden_bones(obj):
            more = f" and {len(overridden) - 4} more" if len(overridden) > 4 else ""
            result.notes.append(
                f"on {quoted(obj.name)}, {', '.join(overridden[:4])}{more} decide those bones, "
                "not the answer set on their channels"
            )
        result.non_quaternion_bones += applied.non_quaternion_bones
    return result
