"""What the Blender add-on and the inference service share: skeleton, rotations, poses, protocol.

Depends on numpy only, because it runs inside Blender's own Python.
"""

__version__ = "0.1.0"
