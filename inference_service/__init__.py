"""The ChatPose inference service: the multimodal LLM and SMPL head behind a ZeroMQ server."""

from shared_protocol import __version__

__all__ = ["__version__"]
