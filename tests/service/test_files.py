"""inference_service.files: folders written whole or not at all, and synced."""

from __future__ import annotations

import os

from inference_service import files


def test_a_read_only_file_is_synced_opened_to_read(tmp_path, monkeypatch):
    # A copied base keeps its files' modes: opened to write, a 0444 one could not be synced.
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "model.safetensors").write_bytes(b"weights")
    opened = []
    real_open = os.open

    def recording_open(path, flags, *args):
        opened.append((os.fspath(path), flags & (os.O_WRONLY | os.O_RDWR)))
        return real_open(path, flags, *args)

    monkeypatch.setattr(files.os, "open", recording_open)
    files.sync(tmp_path, tree=True)
    assert str(tmp_path / "base" / "model.safetensors") in [path for path, _ in opened]
    if os.name != "nt":  # Windows syncs only a file opened for writing
        assert {flags for _, flags in opened} == {0}
