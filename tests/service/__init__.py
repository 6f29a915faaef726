"""Tests of the model half of the inference service (tiny in-process LLaVA)."""
