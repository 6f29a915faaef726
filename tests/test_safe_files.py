"""Writing a file whole or not at all (`shared_protocol.safe_files`); `Motion.save_npz`'s own
cases are in test_pose.py."""

import os

import pytest

from shared_protocol import safe_files
from shared_protocol.safe_files import temporary_name, write_atomically


def test_the_new_file_is_on_disk_before_it_takes_the_name(tmp_path, monkeypatch):
    # A power cut after a rename of a file still in the page cache leaves it empty.
    path = tmp_path / "report.json"
    path.write_text("old")
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(source, target):
        events.append(("replace", os.fspath(source)))
        real_replace(source, target)

    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("no /proc to name a descriptor's file")
    monkeypatch.setattr(safe_files.os, "fsync", fsync)
    monkeypatch.setattr(safe_files.os, "replace", replace)
    write_atomically(path, lambda stream: stream.write(b"new"))
    assert path.read_text() == "new"
    assert [kind for kind, _ in events] == ["fsync", "replace"]
    assert events[0][1] == events[1][1]  # the temporary file, synced, then renamed


def test_a_failed_write_leaves_the_old_file_and_no_temporary_one(tmp_path):
    path = tmp_path / "report.json"
    path.write_text("old")

    def half_then_full_disk(stream):
        stream.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        write_atomically(path, half_then_full_disk)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_temporary_names_are_new_each_time_and_of_one_length():
    first, second = temporary_name("latest"), temporary_name("latest")
    assert first != second and len(first) == len(second)
    assert first.startswith(".latest.") and first.endswith(".tmp")
