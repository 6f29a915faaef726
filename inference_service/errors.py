"""The typed errors of the model half of the service.

Each class carries `code`, the protocol error code the service answers with, so the scheduler
maps an exception to a reply with `error.code` and never has to parse messages.
"""

from __future__ import annotations

from shared_protocol.protocol import ErrorCode


class ChatPoseError(Exception):
    """Base class: something the service can report to a client instead of crashing."""

    code = ErrorCode.MODEL_ERROR


class BadImageError(ChatPoseError):
    """Image bytes that are not a decodable PNG or JPEG."""

    code = ErrorCode.BAD_IMAGE


class EmptyPromptError(ChatPoseError):
    """Nothing to answer: blank text and no image."""

    code = ErrorCode.EMPTY_PROMPT


class UnsupportedInputError(ChatPoseError):
    """A request the model cannot take: too many images, an image marker in the text, ..."""

    code = ErrorCode.UNSUPPORTED_INPUT


class ModelError(ChatPoseError):
    """The model failed while running (for example a degenerate pose-head output)."""

    code = ErrorCode.MODEL_ERROR


class ModelOutOfMemoryError(ModelError):
    """The model, or a pass of it, did not fit on its device; the message says what needs
    less."""


class CheckpointError(ModelError):
    """A checkpoint directory that is missing a file or has a bad field; names both."""


class MissingDependencyError(ModelError):
    """An optional package a requested feature needs (e.g. bitsandbytes) is not installed."""
