"""Tests of the Blender add-on: ``test_core_*`` without bpy, ``test_blender_*`` with bpy."""
