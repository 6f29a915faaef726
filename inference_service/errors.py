"""The typed errors of the model half of the service.

Each class carries `code`, the protocol error code the server answers with, so the server maps
an exception to a reply with `error.code` and never has to parse messages.
"""

from __future__ import annotations


class ChatPoseError(Exception):
    """Base class: something the service can report to a client instead of crashing."""

    code = "model_error"


class BadImageError(ChatPoseError):
    """Image bytes that are not a decodable PNG or JPEG."""

    code = "bad_image"


class EmptyPromptError(ChatPoseError):
    """Nothing to answer: blank text and no image."""

    code = "empty_prompt"


class UnsupportedInputError(ChatPoseError):
    """A request the model cannot take: too many images, an image marker in the text, ..."""

    code = "unsupported_input"


class ModelError(ChatPoseError):
    """The model failed while running (for example a degenerate pose-head output)."""

    code = "model_error"


class ModelOutOfMemoryError(ModelError):
    """The model, or a pass of it, did not fit on its device; the message says what needs
    less."""


class CheckpointError(ModelError):
    """A checkpoint directory that is missing a file or has a bad field; names both."""


class MissingDependencyError(ModelError):
    """An optional package a requested feature needs (e.g. bitsandbytes) is not installed."""
