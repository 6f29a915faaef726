"""Blender-free logic of the add-on: importable and testable without ``bpy``.

Nothing in this package may import ``bpy`` or ``mathutils``; it builds on numpy and
``shared_protocol``. The ``blender`` package next to it holds the thin bpy edges.
"""
