"""inference_service.files: folders written whole or not at all, and synced."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

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


def _written(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _checkpoint(folder: Path) -> None:
    (folder / "base").mkdir()
    (folder / "base" / "model.safetensors").write_bytes(b"new weights")
    (folder / "chatpose.json").write_text("{}")


def test_a_folder_is_written_whole_synced_and_readable_as_the_umask_allows(tmp_path, monkeypatch):
    synced, fsync = [], os.fsync

    def recording(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        fsync(fd)

    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("no /proc to name a descriptor's file")
    monkeypatch.setattr(files.os, "fsync", recording)
    destination = tmp_path / "ckpt"
    umask = os.umask(0o022)
    try:
        files.write_folder_whole(destination, _checkpoint)
    finally:
        os.umask(umask)
    assert _written(destination) == {
        "base/model.safetensors": b"new weights",
        "chatpose.json": b"{}",
    }
    # safetensors writes its files 0600: another account could not load the checkpoint.
    assert (destination / "base" / "model.safetensors").stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    # Its files synced under the temporary name, before the rename; then the rename.
    weights = str(tmp_path / ".ckpt.tmp" / "base" / "model.safetensors")
    assert weights in synced and synced[-1] == str(tmp_path)


@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_a_write_that_fails_midway_leaves_nothing_and_the_destination_as_it_was(tmp_path, failure):
    destination = tmp_path / "step-000002"
    destination.mkdir()
    (destination / "chatpose.json").write_text("the old one")

    def fails_midway(folder: Path) -> None:
        (folder / "base").mkdir()
        (folder / "base" / "model.safetensors").write_bytes(b"half")
        raise failure

    with pytest.raises(type(failure)) as raised:
        files.write_folder_whole(destination, fails_midway)
    assert raised.value is failure  # as it came: the caller names it
    assert _written(destination) == {"chatpose.json": b"the old one"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000002"]


def test_a_folder_there_is_replaced_and_a_killed_write_s_leftover_is_not_kept(tmp_path):
    destination = tmp_path / "packed"
    (destination / "adapter").mkdir(parents=True)  # the old checkpoint, of another layout
    (tmp_path / ".packed.tmp" / "base").mkdir(parents=True)  # a write killed outright
    (tmp_path / ".packed.tmp" / "base" / "stale.safetensors").write_bytes(b"half")
    (tmp_path / ".packed.tmp" / "base").chmod(0o555)  # as copytree copies a read-only folder
    files.write_folder_whole(destination, _checkpoint)
    assert _written(destination) == {
        "base/model.safetensors": b"new weights",
        "chatpose.json": b"{}",
    }
    assert sorted(p.name for p in tmp_path.iterdir()) == ["packed"]


def _replacing_an_old_checkpoint(tmp_path, monkeypatch, renaming_the_new_one) -> Path:
    """`packed` holding an old checkpoint, and os.replace calling ``renaming_the_new_one(rename)``
    in place of the rename that gives the new folder its name (``rename()`` does it)."""
    destination = tmp_path / "packed"
    destination.mkdir()
    (destination / "chatpose.json").write_bytes(b"old")
    replace = os.replace

    def faulted(source, target):
        if Path(source).name == ".packed.tmp":
            renaming_the_new_one(lambda: replace(source, target))
        else:
            replace(source, target)

    monkeypatch.setattr(os, "replace", faulted)
    return destination


def test_a_failure_as_the_new_folder_takes_the_old_one_s_place_keeps_the_old_one(
    tmp_path, monkeypatch
):
    # Removed first and then renamed, a Ctrl-C between the two left neither folder.
    def interrupted(rename):
        raise KeyboardInterrupt

    destination = _replacing_an_old_checkpoint(tmp_path, monkeypatch, interrupted)
    with pytest.raises(KeyboardInterrupt):
        files.write_folder_whole(destination, _checkpoint)
    assert _written(destination) == {"chatpose.json": b"old"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["packed"]


def test_a_ctrl_c_just_after_the_new_folder_has_its_name_stays_a_ctrl_c(tmp_path, monkeypatch):
    # Putting the old one back onto the new one failed (not empty): an OSError, not Ctrl-C.
    def interrupted_once_renamed(rename):
        rename()
        raise KeyboardInterrupt

    destination = _replacing_an_old_checkpoint(tmp_path, monkeypatch, interrupted_once_renamed)
    with pytest.raises(KeyboardInterrupt):
        files.write_folder_whole(destination, _checkpoint)
    assert _written(destination)["chatpose.json"] == b"{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["packed"]  # the old one is gone


def test_a_rename_that_fails_keeps_the_old_folder_whatever_took_the_name(tmp_path, monkeypatch):
    # Another writer's folder at the name meanwhile: the old one was taken for replaced, and
    # removed with the new one, leaving neither.
    def another_writer_first(rename):
        (tmp_path / "packed" / "other").mkdir(parents=True)
        raise OSError(39, "Directory not empty", ".packed.tmp")

    destination = _replacing_an_old_checkpoint(tmp_path, monkeypatch, another_writer_first)
    with pytest.raises(OSError):
        files.write_folder_whole(destination, _checkpoint)
    kept = [p for p in tmp_path.rglob("chatpose.json") if p.read_bytes() == b"old"]
    assert kept, sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))


def test_a_file_where_the_folder_goes_is_refused_before_the_work(tmp_path):
    destination = tmp_path / "packed"
    destination.write_bytes(b"the user's")
    written = []
    with pytest.raises(NotADirectoryError, match="a file is there, not a folder"):
        files.write_folder_whole(destination, written.append)
    assert written == [] and destination.read_bytes() == b"the user's"


def test_a_folder_others_may_write_to_but_not_read_is_written_into(tmp_path, monkeypatch):
    # Its own sync (of the renames) cannot open it: the checkpoint is whole all the same.
    sync = files.sync

    def unreadable_parent(path, **kwargs):
        if path == tmp_path:
            raise PermissionError(13, "Permission denied", str(path))
        sync(path, **kwargs)

    monkeypatch.setattr(files, "sync", unreadable_parent)
    files.write_folder_whole(tmp_path / "packed", _checkpoint)
    assert _written(tmp_path / "packed")["chatpose.json"] == b"{}"


def test_a_read_only_folder_written_is_removed_when_the_write_fails(tmp_path):
    def copies_then_fails(folder: Path) -> None:
        (folder / "base").mkdir()
        (folder / "base" / "model.safetensors").write_bytes(b"half")
        (folder / "base").chmod(0o555)  # copytree gives each folder its source's mode
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        files.write_folder_whole(tmp_path / "run" / "base", copies_then_fails)
    assert list((tmp_path / "run").iterdir()) == []


def test_the_user_s_empty_folder_is_kept_and_filled_the_config_last(tmp_path, monkeypatch):
    # A link's target, a mount, the shell's folder: a rename would put another in its place.
    destination = tmp_path / "ckpt"
    destination.mkdir()
    inode = destination.stat().st_ino
    assert files.temporary_folder(destination, fill=True) == destination / ".writing.tmp"
    assert files.temporary_folder(tmp_path / "new", fill=True) == tmp_path / ".new.tmp"
    moved, replace = [], os.replace

    def recording(source, target):
        moved.append(Path(target).name)
        replace(source, target)

    monkeypatch.setattr(files.os, "replace", recording)
    files.write_folder_whole(destination, _checkpoint, fill=True)
    assert destination.stat().st_ino == inode
    assert moved == ["base", "chatpose.json"]  # a folder without it is no checkpoint
    assert _written(destination) == {
        "base/model.safetensors": b"new weights",
        "chatpose.json": b"{}",
    }
    monkeypatch.undo()
    files.write_folder_whole(tmp_path / "new", _checkpoint, fill=True)  # none there: renamed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "new"]


def test_a_fill_that_fails_while_moving_in_leaves_the_user_s_folder_empty(tmp_path, monkeypatch):
    destination = tmp_path / "ckpt"
    destination.mkdir()
    replace = os.replace

    def full(source, target):
        if Path(target).name == "chatpose.json":
            raise KeyboardInterrupt
        replace(source, target)

    monkeypatch.setattr(files.os, "replace", full)
    with pytest.raises(KeyboardInterrupt):
        files.write_folder_whole(destination, _checkpoint, fill=True)
    assert list(destination.iterdir()) == []  # base/, moved in already, is taken out again
