"""The bpy edges of the add-on: armature and mesh creation, posing, keyframes, operators.

Kept thin: the maths and the bookkeeping live in ``..core``, which does not import bpy.
"""
