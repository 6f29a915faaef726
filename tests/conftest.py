"""Fixtures shared by the whole suite."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """The tiny LLaVA of tests/service/tiny_llava.py (random weights) as a checkpoint directory,
    built in-process once per test session."""
    from transformers.utils import logging as hf_logging

    from tests.service import tiny_llava

    hf_logging.disable_progress_bar()
    tokenizer = tiny_llava.build_tokenizer()
    return tiny_llava.write_checkpoint(
        tmp_path_factory.mktemp("tiny") / "checkpoint",
        tiny_llava.build_llava(tokenizer),
        tiny_llava.build_processor(tokenizer),
        tiny_llava.build_head(),
    )
