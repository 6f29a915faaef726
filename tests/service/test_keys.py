"""`python -m inference_service.keys`: keys are made once, kept private, and never replaced."""

import stat

import pytest

from inference_service import keys


def test_running_it_again_keeps_every_key_and_adds_new_clients(tmp_path):
    assert keys.make_keys(tmp_path, ["animator"]) == ["animator"]
    before = {p.name: p.read_bytes() for p in tmp_path.rglob("*.key*")}
    assert keys.make_keys(tmp_path, ["animator", "lighter"]) == ["lighter"]
    after = {p.name: p.read_bytes() for p in tmp_path.rglob("*.key*")}
    assert all(after[name] == data for name, data in before.items())
    assert {"lighter.key_secret", "lighter.key"} <= set(after)
    assert (tmp_path / "authorized_clients" / "lighter.key").exists()


def test_secret_keys_are_readable_by_their_owner_only(tmp_path):
    keys.make_keys(tmp_path, ["animator"])
    for name in ("server.key_secret", "animator.key_secret"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600


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
