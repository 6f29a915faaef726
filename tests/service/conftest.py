"""Session fixtures: the tiny checkpoint is built, and loaded, once for all service tests."""

from __future__ import annotations

import pytest
from transformers.utils import logging as hf_logging

from inference_service.modeling_chatpose import ChatPoseModel

from . import tiny_llava

hf_logging.disable_progress_bar()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    tokenizer = tiny_llava.build_tokenizer()
    root = tmp_path_factory.mktemp("tiny") / "checkpoint"
    return tiny_llava.write_checkpoint(
        root,
        tiny_llava.build_llava(tokenizer),
        tiny_llava.build_processor(tokenizer),
        tiny_llava.build_head(),
    )


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint):
    return ChatPoseModel.from_checkpoint(tiny_checkpoint, device="cpu")
