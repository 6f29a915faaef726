"""Session fixtures: the tiny model (checkpoint from tests/conftest.py), loaded once."""

from __future__ import annotations

import pytest
from transformers.utils import logging as hf_logging

from inference_service.modeling_chatpose import ChatPoseModel

hf_logging.disable_progress_bar()


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint):
    return ChatPoseModel.from_checkpoint(tiny_checkpoint, device="cpu")
