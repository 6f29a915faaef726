"""Session fixtures: the tiny model (checkpoint from tests/conftest.py), loaded once."""

from __future__ import annotations

import pytest
from transformers.utils import logging as hf_logging

from inference_service.modeling_chatpose import ChatPoseModel

hf_logging.disable_progress_bar()


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint):
    return ChatPoseModel.from_checkpoint(tiny_checkpoint, device="cpu")


@pytest.fixture
def answers_yes_on_stdin(monkeypatch, tmp_path) -> list:
    """Answers "y" to whatever transformers asks on stdin (whether to run a checkpoint's own
    code), and keeps what it copies to run away from the user's cache; the prompts asked."""
    import builtins

    import transformers

    asked = []

    def answer_yes(prompt=""):
        asked.append(prompt)
        return "y"

    monkeypatch.setattr(builtins, "input", answer_yes)
    monkeypatch.setattr(
        transformers.dynamic_module_utils, "HF_MODULES_CACHE", str(tmp_path / "modules")
    )
    return asked
