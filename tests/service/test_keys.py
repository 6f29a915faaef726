"""`python -m inference_service.keys`: keys are made once, kept private, and never replaced."""

import os
import stat
from pathlib import Path

import pytest
import zmq
import zmq.auth

from inference_service import keys


def test_running_it_again_keeps_every_key_and_adds_new_clients(tmp_path):
    assert keys.make_keys(tmp_path, ["animator"]) == ["animator"]
    before = {p.name: p.read_bytes() for p in tmp_path.rglob("*.key*")}
    assert keys.make_keys(tmp_path, ["animator", "lighter"]) == ["lighter"]
    after = {p.name: p.read_bytes() for p in tmp_path.rglob("*.key*")}
    assert all(after[name] == data for name, data in before.items())
    assert {"lighter.key_secret", "lighter.key"} <= set(after)
    assert (tmp_path / "authorized_clients" / "lighter.key").exists()


def test_a_revoked_client_run_again_is_said_to_be_revoked_and_can_get_a_new_pair(tmp_path, capsys):
    # Revoked as security.md says, then run again: "kept the existing keys", exit 0, and the
    # client still refused, with nothing said.
    keys.main([str(tmp_path), "--client", "animator3"])
    old = (tmp_path / "animator3.key_secret").read_bytes()
    (tmp_path / "authorized_clients" / "animator3.key").unlink()
    capsys.readouterr()
    assert keys.main([str(tmp_path), "--client", "animator3"]) == 0
    err = capsys.readouterr().err
    assert "note: animator3 is not authorized (no authorized_clients/animator3.key: revoked)" in err
    (tmp_path / "animator3.key_secret").unlink()  # as the note says
    assert keys.main([str(tmp_path), "--client", "animator3"]) == 0
    assert "made animator3" in capsys.readouterr().out
    assert (tmp_path / "authorized_clients" / "animator3.key").exists()
    assert (tmp_path / "animator3.key_secret").read_bytes() != old


def test_a_new_server_key_pair_is_said_to_go_to_every_client(tmp_path, capsys):
    # The studio review: replaced as security.md says, the new server key went unmentioned.
    assert keys.main([str(tmp_path), "--client", "animator"]) == 0
    said = f"new server key pair: give {tmp_path / 'server.key'} to every client"
    assert said in capsys.readouterr().out
    assert keys.main([str(tmp_path), "--client", "animator"]) == 0
    assert "new server key pair" not in capsys.readouterr().out  # kept: nothing to hand out
    old = (tmp_path / "server.key").read_bytes()
    (tmp_path / "server.key").unlink()
    (tmp_path / "server.key_secret").unlink()
    assert keys.main([str(tmp_path), "--client", "animator"]) == 0
    assert said in capsys.readouterr().out
    assert (tmp_path / "server.key").read_bytes() != old


def test_run_again_without_client_names_still_says_client_is_not_authorised(tmp_path, capsys):
    # A first run cut short (authorized_clients/ read-only), then run again as it was.
    assert keys.main([str(tmp_path)]) == 0
    (tmp_path / "authorized_clients" / "client.key").unlink()
    capsys.readouterr()
    assert keys.main([str(tmp_path)]) == 0
    assert "note: client is not authorized" in capsys.readouterr().err
    (tmp_path / "client.key_secret").unlink()
    (tmp_path / "authorized_clients" / "client.key").symlink_to(tmp_path / "nowhere")
    assert keys.main([str(tmp_path)]) == 2  # its place is a link: named, not passed over
    assert "client.key is a link (to " in capsys.readouterr().err


def test_which_folders_get_a_client_when_none_is_named(tmp_path):
    keys.make_keys(tmp_path, [])  # the server's pair alone: no client yet
    assert keys._default_clients(tmp_path) == ["client"]
    (tmp_path / "authorized_clients" / "animator.key").write_text("")  # its secret handed out
    assert keys._default_clients(tmp_path) == []


def test_a_folder_where_a_key_goes_is_named(tmp_path, capsys):
    (tmp_path / "server.key").mkdir(parents=True)
    assert keys.main([str(tmp_path)]) == 2
    assert f"{tmp_path / 'server.key'} is not a file: remove it" in capsys.readouterr().err


def test_run_again_without_client_names_it_authorises_nobody_new(tmp_path, capsys):
    # Run again to write a lost server.key, or a new server pair, it made and authorised a
    # client named 'client' that nobody asked for.
    assert keys.main([str(tmp_path)]) == 0  # a new folder: one client, as the help says
    assert "made client" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "authorized_clients").iterdir()) == ["client.key"]
    studio = tmp_path / "studio"
    assert keys.main([str(studio), "--client", "animator1"]) == 0
    (studio / "server.key").unlink()
    assert keys.main([str(studio)]) == 0
    assert "made no new client" in capsys.readouterr().out
    assert (studio / "server.key").is_file()
    for path in (studio / "server.key", studio / "server.key_secret"):  # a new server pair
        path.unlink()
    (studio / "authorized_clients" / "animator1.key").unlink()  # and animator1 revoked
    assert keys.main([str(studio)]) == 0
    assert not (studio / "client.key_secret").exists()
    assert list((studio / "authorized_clients").iterdir()) == []


def test_a_damaged_server_key_is_named_and_a_lost_public_half_written_again(tmp_path, capsys):
    # chatpose-serve said "make keys with python -m inference_service.keys", which kept the
    # damaged file and said nothing: a circle.
    assert keys.main([str(tmp_path)]) == 0
    public = (tmp_path / "server.key").read_text()
    (tmp_path / "server.key").unlink()  # given away, and lost here
    capsys.readouterr()
    assert keys.main([str(tmp_path)]) == 0
    assert f"wrote {tmp_path / 'server.key'} again" in capsys.readouterr().out
    assert _public_key(tmp_path / "server.key") == _public_key_of(public)
    (tmp_path / "server.key").unlink()
    (tmp_path / "server.key").symlink_to(tmp_path / "elsewhere.key")  # dangling: not followed
    capsys.readouterr()
    assert keys.main([str(tmp_path)]) == 0
    assert not (tmp_path / "elsewhere.key").exists()
    assert (
        "server.key is a link to nothing; remove it and run this again" in capsys.readouterr().out
    )
    (tmp_path / "server.key").unlink()
    secret = (tmp_path / "server.key_secret").read_text()
    wrong = secret.replace(_public_key_of(public).decode(), "0" * 40)  # another public line
    (tmp_path / "server.key_secret").write_text(wrong)
    assert keys.main([str(tmp_path)]) == 0
    assert _public_key(tmp_path / "server.key") == _public_key_of(public)  # the secret's own
    (tmp_path / "server.key_secret").write_text("junk")
    assert keys.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "server.key_secret is not a CURVE key pair; it is kept" in err
    assert "move it away and run this again" in err


def test_a_server_key_this_user_cannot_read_is_not_called_damaged(tmp_path, capsys, monkeypatch):
    # Run as another user, or without sudo: "move it away for a new pair" would lock every
    # client out of a pair that is fine.
    assert keys.main([str(tmp_path)]) == 0

    def denied(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(keys.zmq.auth, "load_certificate", denied)
    assert keys.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "Permission denied" in err and "not a CURVE key pair" not in err
    assert "run this as the user whose keys they are" in err


def _public_key(path: Path) -> bytes:
    import zmq.auth

    return zmq.auth.load_certificate(path)[0]


def _public_key_of(text: str) -> bytes:
    return next(
        line.split("=", 1)[1].strip().strip('"').encode()
        for line in text.splitlines()
        if "public-key" in line
    )


def test_secret_keys_are_readable_by_their_owner_only(tmp_path, monkeypatch):
    tmp_path.chmod(0o755)  # a folder others may read, as a shared one is
    opened = os.open
    modes_when_made = {}

    def open_and_look(path, flags, mode=0o777, **kwargs):  # what others could read at once
        descriptor = opened(path, flags, mode, **kwargs)
        if str(path).endswith(".key_secret"):
            modes_when_made[Path(path).name] = stat.S_IMODE(os.fstat(descriptor).st_mode)
        return descriptor

    monkeypatch.setattr(keys.os, "open", open_and_look)
    umask = os.umask(0)  # not counted on: a umask that takes nothing away
    try:
        keys.make_keys(tmp_path, ["animator"])
    finally:
        os.umask(umask)
        monkeypatch.undo()
    assert modes_when_made == {"server.key_secret": 0o600, "animator.key_secret": 0o600}
    for name in ("server.key_secret", "animator.key_secret"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600
    for public in ("server.key", "authorized_clients/animator.key"):
        assert stat.S_IMODE((tmp_path / public).stat().st_mode) == 0o644


def test_a_public_key_is_readable_by_all_whatever_the_umask(tmp_path):
    umask = os.umask(0o077)  # a careful user's: it would leave server.key theirs alone
    try:
        keys.make_keys(tmp_path, ["animator"])
    finally:
        os.umask(umask)
    for public in ("server.key", "authorized_clients/animator.key"):
        assert stat.S_IMODE((tmp_path / public).stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "server.key_secret").stat().st_mode) == 0o600


def test_a_server_secret_key_deleted_alone_gets_a_new_pair(tmp_path, capsys):
    # security.md: delete the secret key to replace the pair; its old public half goes too.
    assert keys.main([str(tmp_path)]) == 0
    old = (tmp_path / "server.key").read_bytes()
    (tmp_path / "server.key_secret").unlink()
    assert keys.main([str(tmp_path)]) == 0
    assert "new server key pair" in capsys.readouterr().out
    assert (tmp_path / "server.key").read_bytes() != old
    assert _public_key(tmp_path / "server.key") == _public_key_of(
        (tmp_path / "server.key_secret").read_text()
    )


def test_a_link_planted_after_the_look_is_not_written_through(tmp_path, monkeypatch):
    # Looked at, then a link put where the key goes: the open itself refuses it.
    monkeypatch.setattr(keys, "_check_new_key_file", lambda path: None)
    (tmp_path / "server.key_secret").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(keys.KeysError, match="appeared while this ran"):
        keys.make_keys(tmp_path, [])
    assert not (tmp_path / "elsewhere").exists()


def test_the_key_files_read_back_as_zeromq_reads_them(tmp_path):
    keys.make_keys(tmp_path, ["animator"])
    for secret_file, public_file in [
        (tmp_path / "server.key_secret", tmp_path / "server.key"),
        (tmp_path / "animator.key_secret", tmp_path / "authorized_clients" / "animator.key"),
    ]:
        public, secret = zmq.auth.load_certificate(secret_file)
        assert zmq.curve_public(secret) == public
        assert zmq.auth.load_certificate(public_file) == (public, None)
    animator = zmq.auth.load_certificate(tmp_path / "animator.key_secret")[0]
    assert zmq.auth.load_certificates(tmp_path / "authorized_clients") == {animator: True}


@pytest.mark.skipif(os.name != "posix", reason="links made without privileges")
@pytest.mark.parametrize(
    ("planted", "points_at_a_file"),
    [
        ("server.key_secret", False),
        ("server.key", False),
        ("server.key", True),  # its file was overwritten with the public key
        ("animator.key_secret", False),
        ("authorized_clients/animator.key", False),
    ],
)
def test_a_new_key_is_never_written_through_a_link(tmp_path, capsys, planted, points_at_a_file):
    # zmq.auth.create_certificates opened each name and followed a link there: one planted as
    # server.key_secret took the new secret key wherever it pointed, and nothing was said.
    folder = tmp_path / "keys"
    (folder / "authorized_clients").mkdir(parents=True)
    target = tmp_path / "elsewhere"
    if points_at_a_file:
        target.write_text("someone's file\n")
    link = folder / planted
    link.symlink_to(target)
    assert keys.main([str(folder), "--client", "animator"]) == 2
    err = capsys.readouterr().err
    assert f"error: {link} is a link (to {target}), and a new key is never written" in err
    assert "remove the link and run this again" in err
    if points_at_a_file:
        assert target.read_text() == "someone's file\n"
    else:
        assert not target.exists()
    if planted.startswith("server"):  # refused before either half is written
        assert [path.name for path in folder.iterdir() if not path.is_symlink()] == [
            "authorized_clients"
        ]
    link.unlink()  # as the error says
    assert keys.main([str(folder), "--client", "animator"]) == 0
    assert (folder / "authorized_clients" / "animator.key").is_file()


@pytest.mark.parametrize("name", ["server", "a/b", "", "../x"])
def test_a_client_name_that_would_clash_or_escape_is_refused(tmp_path, name, capsys):
    keys.make_keys(tmp_path, ["animator"])
    server = (tmp_path / "server.key_secret").read_bytes()
    assert keys.main([str(tmp_path), "--client", name]) == 2
    assert f"client name {name!r}" in capsys.readouterr().err
    assert (tmp_path / "server.key_secret").read_bytes() == server


def test_a_file_where_the_folder_goes_is_an_error(tmp_path, capsys):
    (tmp_path / "f").write_text("")
    assert keys.main([str(tmp_path / "f")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


@pytest.mark.skipif(os.name != "posix", reason="links made without privileges")
def test_a_keys_folder_that_links_to_nothing_is_named_as_such(tmp_path, capsys):
    # It said "cannot use ... (File exists): run this as the user whose keys they are".
    (tmp_path / "keys").symlink_to(tmp_path / "secure" / "keys")
    assert keys.main([str(tmp_path / "keys")]) == 2
    err = capsys.readouterr().err
    assert f"is a link to {tmp_path / 'secure' / 'keys'}, which is not there" in err
    assert not (tmp_path / "secure").exists()
    (tmp_path / "secure" / "keys").mkdir(parents=True)  # as it says: the link is then used
    assert keys.main([str(tmp_path / "keys")]) == 0
    assert (tmp_path / "secure" / "keys" / "server.key_secret").is_file()


def test_a_link_where_one_client_s_key_goes_makes_no_key_at_all(tmp_path, capsys):
    (tmp_path / "lighter.key_secret").symlink_to(tmp_path / "elsewhere")
    assert keys.main([str(tmp_path), "--client", "animator", "--client", "lighter"]) == 2
    assert "lighter.key_secret is a link" in capsys.readouterr().err
    assert sorted(path.name for path in tmp_path.rglob("*") if not path.is_symlink()) == [
        "authorized_clients"
    ]
    # A name given twice is made once.
    assert keys.make_keys(tmp_path / "other", ["animator", "animator"]) == ["animator"]
