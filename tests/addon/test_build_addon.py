"""build_addon.py: the extension zips (one per Blender Python), their manifests and wheels, and a
real install into Blender.

The first run downloads the pyzmq wheels into build/wheels-cache/ (the package registry must be
reachable); later runs use the cache. Without network the build tests skip, saying why; on a
CI machine (CI set, as CI services set it) they fail instead, since CI reaches the registry.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
import tomllib
import zipfile

import pytest

import build_addon

pytestmark = pytest.mark.network  # runs in the normal suite; `-m "not network"` deselects it


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    try:
        return build_addon.build(out)
    except build_addon.WheelFetchError as exc:
        if exc.network and not os.environ.get("CI"):
            pytest.skip(f"pyzmq wheels could not be downloaded (no network?): {exc}")
        raise


OLD, NEW = build_addon.RELEASES  # Blender 4.2-5.0 (Python 3.11), 5.1 and later (3.13)
PLATFORMS = ("linux-x64", "linux-arm64", "windows-x64", "windows-arm64", "macos-arm64", "macos-x64")


def manifest_of(zip_path) -> dict:
    with zipfile.ZipFile(zip_path) as zf:
        return tomllib.loads(zf.read("blender_manifest.toml").decode())


def test_one_zip_per_blender_python_each_passing_its_checks(built):
    version = build_addon.project_version()
    assert [p.name for p in built.zips.values()] == [
        f"chatpose-{version}-blender-4.2-5.0.zip",
        f"chatpose-{version}-blender-5.1.zip",
    ]
    for zip_path in built.zips.values():
        assert build_addon.archive_problems(zip_path) == []
    assert "validate" in built.validation  # Blender's validator (or bpy's copy of it) ran


def test_each_manifest_is_the_repositorys_for_its_blender_versions(built):
    source = tomllib.loads(build_addon.MANIFEST_PATH.read_text("utf-8"))
    with open(build_addon.PYPROJECT_PATH, "rb") as f:
        version = tomllib.load(f)["project"]["version"]
    for zip_path in built.zips.values():
        manifest = manifest_of(zip_path)
        for key in build_addon.REQUIRED_MANIFEST_KEYS:
            assert key in manifest
        assert manifest["version"] == version
        assert manifest["schema_version"] == "1.0.0" and manifest["id"] == "chatpose"
        assert set(manifest["permissions"]) == {"network", "files"}
        shared = f"./wheels/{built.shared_wheel_path.name}"  # each zip's own, added by the build
        assert shared in manifest["wheels"] and shared not in source["wheels"]
        assert set(manifest["wheels"]) - {shared} < set(source["wheels"])
        rest = {k: v for k, v in manifest.items() if not k.startswith(("wheels", "blender_"))}
        assert rest == {k: v for k, v in source.items() if not k.startswith(("wheels", "blender_"))}
    assert (manifest_of(built.zips[OLD])["blender_version_min"], manifest_of(built.zips[OLD])[
        "blender_version_max"]) == ("4.2.0", "5.1.0")  # fmt: skip
    assert manifest_of(built.zips[NEW])["blender_version_min"] == "5.1.0"
    assert "blender_version_max" not in manifest_of(built.zips[NEW])


def test_every_listed_wheel_is_in_its_zip_and_every_platform_is_covered(built):
    zmq_version = build_addon.manifest_pyzmq_version()
    version = build_addon.project_version()
    for release, zip_path in built.zips.items():
        manifest = manifest_of(zip_path)
        with zipfile.ZipFile(zip_path) as zf:
            names = set(zf.namelist())
        wheels = [w.removeprefix("./") for w in manifest["wheels"]]
        assert {n for n in names if n.startswith("wheels/")} == set(wheels)
        assert f"wheels/{built.shared_wheel_path.name}" in wheels
        assert built.shared_wheel_path.name.startswith(f"chatpose_shared_protocol-{version}+")
        assert sorted(manifest["platforms"]) == sorted(PLATFORMS)
        for platform in PLATFORMS:
            matching = [
                w
                for w in wheels
                if w.startswith(f"wheels/pyzmq-{zmq_version}-")
                and build_addon.wheel_supports(w.rsplit("/", 1)[1], release.python, platform)
            ]
            assert matching, f"no pyzmq wheel for Python {release.python} on {platform}"


def test_the_shared_wheel_s_version_changes_with_its_code_alone():
    # Blender skips a wheel whose name and version it has installed: a rebuild of the same
    # version with other shared_protocol code must get another wheel name.
    files = [("shared_protocol/__init__.py", b"x = 1\n"), ("shared_protocol/pose.py", b"")]
    version = build_addon.shared_wheel_version("0.1.0", files)
    assert version.startswith("0.1.0+") and len(version) == len("0.1.0+") + 10
    assert build_addon.shared_wheel_version("0.1.0", files[::-1]) == version  # order: none
    edited = [("shared_protocol/__init__.py", b"x = 2\n"), files[1]]
    assert build_addon.shared_wheel_version("0.1.0", edited) != version
    moved = [("shared_protocol/__init__.py", b""), ("shared_protocol/pose.py", b"x = 1\n")]
    assert build_addon.shared_wheel_version("0.1.0", moved) != version


def test_blender_reads_each_zips_python_as_its_releases(built):
    """Blender's own code (bpy's copy of the extension tool) reads an extension's Pythons off its
    wheels' names; a zip holding cp311 and abi3 wheels reads as 3.11 only, refused by 5.1+."""
    import importlib.util

    script, _ = build_addon._bundled_validator()
    spec = importlib.util.spec_from_file_location("blender_ext", script)
    blender_ext = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(blender_ext)
    read = blender_ext.python_versions_from_wheels
    assert read(manifest_of(built.zips[OLD])["wheels"]) == {(3, 11)}
    assert read(manifest_of(built.zips[NEW])["wheels"]) == {(3,)}  # any 3.x: 3.13 too
    both = tomllib.loads(build_addon.MANIFEST_PATH.read_text("utf-8"))["wheels"]
    assert read(both) == {(3, 11)}  # why one zip cannot serve both


def test_zips_hold_the_addon_and_nothing_of_the_service(built):
    for zip_path in built.zips.values():
        with zipfile.ZipFile(zip_path) as zf:
            names = zf.namelist()
            shared = zf.read(f"wheels/{built.shared_wheel_path.name}")
        assert {"__init__.py", "blender_manifest.toml", "core/posing.py", "blender/posing.py"} <= (
            set(names)
        )
        assert "LICENSE" in names  # MIT's notice goes with every copy
        assert not any("inference_service" in n or "__pycache__" in n for n in names)
        assert not any(n.startswith("shared_protocol/") for n in names)  # it comes as a wheel
        assert built.shared_wheel_path.read_bytes() == shared


def test_only_sources_are_shipped_not_what_editors_and_merges_leave_beside_them(tmp_path):
    for name in ("__init__.py", "core/posing.py", "blender_manifest.toml", "PROTOCOL.md"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    for stray in ("panel.py~", "core/posing.py.orig", "notes.txt", ".panel.py.swp"):
        (tmp_path / stray).write_text("x")
    (tmp_path / "__pycache__").mkdir()
    (tmp_path / "__pycache__" / "panel.cpython-311.pyc").write_text("x")
    shipped = [rel for rel, _ in build_addon._source_files(tmp_path)]
    assert shipped == ["PROTOCOL.md", "__init__.py", "blender_manifest.toml", "core/posing.py"]


def test_shared_protocol_wheel_installs_and_imports(built, tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--quiet",
         "--disable-pip-version-check", "--target", str(target), str(built.shared_wheel_path)],
        check=True,
    )  # fmt: skip
    code = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(target)!r})
        import shared_protocol, shared_protocol.pose, shared_protocol.protocol
        assert shared_protocol.__file__.startswith({str(target)!r}), shared_protocol.__file__
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    with zipfile.ZipFile(built.shared_wheel_path) as zf:
        names = zf.namelist()
        record = zf.read(next(n for n in names if n.endswith("RECORD"))).decode()
    assert "shared_protocol/PROTOCOL.md" in names
    version = built.shared_wheel_path.name.split("-")[1]  # 0.1.0+<hash of its files>
    assert all(n.split("/")[0] in {"shared_protocol", "chatpose_shared_protocol-"
               f"{version}.dist-info"} for n in names)  # fmt: skip
    assert all(n in record for n in names)


def test_a_legacy_zip_of_another_version_than_its_bl_info_is_refused(tmp_path, monkeypatch):
    assert build_addon.bl_info_version() == build_addon.project_version()
    monkeypatch.setattr(build_addon, "project_version", lambda: "0.2.0")
    with pytest.raises(build_addon.BuildError, match="bl_info's version 0.1.0 differs from"):
        build_addon.write_legacy_zip(tmp_path / "legacy.zip")


def test_legacy_zip_is_one_folder_without_manifest(built):
    with zipfile.ZipFile(built.legacy_zip_path) as zf:
        names = zf.namelist()
    assert all(n.startswith("chatpose/") for n in names)
    assert "chatpose/__init__.py" in names and "chatpose/blender_manifest.toml" not in names
    assert "chatpose/LICENSE" in names


def test_builds_are_reproducible(built, tmp_path):
    (tmp_path / "chatpose_shared_protocol-0.1.0+0123456789-py3-none-any.whl").write_bytes(b"")
    again = build_addon.build(tmp_path, legacy=False, validate=False)
    # An earlier build's wheel goes: `pip install dist/chatpose_shared_protocol-*.whl` takes one.
    assert [p.name for p in tmp_path.glob("chatpose_shared_protocol-*")] == [
        again.shared_wheel_path.name
    ]
    for release, zip_path in built.zips.items():
        assert again.zips[release].read_bytes() == zip_path.read_bytes()


def test_command_line_build(built, tmp_path):
    # Run from another folder: a relative --output-dir is taken from there.
    proc = subprocess.run(
        [sys.executable, str(build_addon.ROOT / "build_addon.py"), "--output-dir", "out",
         "--no-validate", "--no-legacy"],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert all((tmp_path / "out" / z.name).is_file() for z in built.zips.values())
    assert "blender-5.1.zip  (Blender 5.1.0 and later)" in proc.stdout
    # The manifest's blender_version_max is the first release not served.
    assert "blender-4.2-5.0.zip  (Blender 4.2.0 before 5.1.0)" in proc.stdout
    (tmp_path / "file").write_text("")
    proc = subprocess.run(
        [sys.executable, str(build_addon.ROOT / "build_addon.py"), "--output-dir", "file",
         "--no-validate", "--no-legacy"],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 1 and "--output-dir file is a file, not a folder" in proc.stderr


def test_archive_checks_catch_problems(built, tmp_path):
    def rewrite(name, change_manifest=None, extra=()):
        path = tmp_path / name
        with zipfile.ZipFile(built.zips[OLD]) as src, zipfile.ZipFile(path, "w") as dst:
            for item in src.infolist():
                data = src.read(item)
                if item.filename == "blender_manifest.toml" and change_manifest:
                    data = change_manifest(data.decode()).encode()
                if item.filename.startswith("wheels/pyzmq") and "win_amd64" in item.filename:
                    if "dropwheel" in name:
                        continue
                dst.writestr(item, data)
            for extra_name in extra:
                dst.writestr(extra_name, b"")
        return build_addon.archive_problems(path)

    version = build_addon.project_version()
    assert any("inference_service" in p for p in rewrite("a.zip", extra=["inference_service/x.py"]))
    assert any(
        "version" in p
        for p in rewrite("b.zip", lambda t: t.replace(f'version = "{version}"', 'version = "9.9"'))
    )
    assert any("missing" in p for p in rewrite("dropwheel.zip"))
    assert any(
        "no pyzmq wheel" in p
        for p in rewrite(
            "c.zip", lambda t: "\n".join(x for x in t.split("\n") if "win_amd64" not in x)
        )
    )
    assert any("network" in p for p in rewrite("d.zip", lambda t: t.replace("network =", "net =")))
    assert any(
        "blender_version_max should be '5.1.0'" in p
        for p in rewrite("e.zip", lambda t: t.replace('blender_version_max = "5.1.0"\n', ""))
    )
    abi3 = "./wheels/pyzmq-27.3.0-cp312-abi3-win_amd64.whl"
    problems = rewrite("f.zip", lambda t: t.replace("wheels = [\n", f'wheels = [\n  "{abi3}",\n'))
    assert any(
        "pyzmq-27.3.0-cp312-abi3-win_amd64.whl is not for Python 3.11" in p for p in problems
    )
    # The shared wheel: one per zip, of this version and hashed; none in the repository's.
    shared = f"./wheels/{built.shared_wheel_path.name}"
    unhashed = f"./wheels/{build_addon.shared_wheel_name(version)}"
    for name, change in [
        ("g.zip", lambda t: t.replace(f'  "{shared}",\n', "")),
        ("h.zip", lambda t: t.replace(shared, unhashed)),
        ("i.zip", lambda t: t.replace(f'  "{shared}",\n', f'  "{shared}",\n  "{unhashed}",\n')),
    ]:
        assert any(
            "wheels list no one chatpose_shared_protocol-" in p for p in rewrite(name, change)
        )
    repository = tomllib.loads(build_addon.MANIFEST_PATH.read_text("utf-8"))
    assert build_addon.manifest_problems(repository, version) == []
    repository["wheels"] = [*repository["wheels"], shared]
    assert any("the build adds it" in p for p in build_addon.manifest_problems(repository, version))


def test_wheel_supports():
    ws = build_addon.wheel_supports
    linux = "pyzmq-27.3.0-cp311-cp311-manylinux_2_26_x86_64.manylinux_2_28_x86_64.whl"
    assert ws(linux, "3.11", "linux-x64") and not ws(linux, "3.13", "linux-x64")
    assert not ws(linux, "3.11", "windows-x64")
    abi3 = "pyzmq-27.3.0-cp312-abi3-macosx_11_0_arm64.whl"
    assert ws(abi3, "3.13", "macos-arm64") and not ws(abi3, "3.13", "macos-x64")
    assert not ws(abi3, "3.11", "macos-arm64")  # abi3 from 3.12 on
    # Blender 4.2.0 installs no universal2 wheel on either Mac (later 4.2 releases do).
    assert not ws("pyzmq-27.3.0-cp312-abi3-macosx_10_15_universal2.whl", "3.13", "macos-arm64")
    assert ws("x-1.0-py3-none-any.whl", "3.13", "windows-x64")
    arm = "pyzmq-27.3.0-cp311-cp311-manylinux_2_26_aarch64.manylinux_2_28_aarch64.whl"
    assert ws(arm, "3.11", "linux-arm64") and not ws(arm, "3.11", "linux-x64")
    assert ws("pyzmq-27.3.0-cp312-abi3-win_arm64.whl", "3.13", "windows-arm64")
    assert not ws("pyzmq-27.3.0-cp312-abi3-win_arm64.whl", "3.13", "windows-x64")
    assert not ws("not-a-wheel.zip", "3.11", "linux-x64")


def test_a_universal2_wheel_is_tagged_for_each_mac_with_its_record_kept_true(tmp_path):
    universal = tmp_path / "pyzmq-27.3.0-cp311-cp311-macosx_10_15_universal2.whl"
    wheel_meta = (
        b"Wheel-Version: 1.0\nRoot-Is-Purelib: false\nTag: cp311-cp311-macosx_10_15_universal2\n"
    )
    files = {"zmq/__init__.py": b"x = 1\n", "pyzmq-27.3.0.dist-info/WHEEL": wheel_meta}
    record = "".join(
        f"{name},{build_addon._record_hash(data)},{len(data)}\n" for name, data in files.items()
    )
    with zipfile.ZipFile(universal, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        zf.writestr("pyzmq-27.3.0.dist-info/RECORD", record + "pyzmq-27.3.0.dist-info/RECORD,,\n")
    for platform, tag in (
        ("macos-arm64", "macosx_11_0_arm64"),
        ("macos-x64", "macosx_10_15_x86_64"),
    ):
        thin = build_addon.one_mac_wheel(universal, platform, tmp_path)
        assert thin.name == f"pyzmq-27.3.0-cp311-cp311-{tag}.whl"
        assert build_addon.wheel_supports(thin.name, "3.11", platform)
        with zipfile.ZipFile(thin) as zf:
            assert f"Tag: cp311-cp311-{tag}\n".encode() in zf.read("pyzmq-27.3.0.dist-info/WHEEL")
            assert zf.read("zmq/__init__.py") == files["zmq/__init__.py"]
            for line in zf.read("pyzmq-27.3.0.dist-info/RECORD").decode().splitlines():
                name, digest, size = line.split(",")
                if digest:  # every file as the record says, the rewritten WHEEL too
                    data = zf.read(name)
                    assert (digest, int(size)) == (build_addon._record_hash(data), len(data))
    linux = tmp_path / "pyzmq-27.3.0-cp311-cp311-manylinux_2_28_x86_64.whl"
    assert build_addon.one_mac_wheel(linux, "macos-arm64", tmp_path) == linux


def test_update_manifest_wheels_rewrites_only_the_list():
    text = 'id = "chatpose"\nwheels = [\n  "./wheels/old.whl",\n]\n\n[permissions]\nfiles = "x"\n'
    new = build_addon.update_manifest_wheels(text, ["./wheels/a.whl", "./wheels/b.whl"])
    data = tomllib.loads(new)
    assert data["wheels"] == ["./wheels/a.whl", "./wheels/b.whl"]
    assert data["id"] == "chatpose" and data["permissions"] == {"files": "x"}


def test_offline_download_failure_is_reported_clearly(tmp_path, monkeypatch):
    def fake_run(*args, **kwargs):
        return subprocess.CompletedProcess(
            args,
            1,
            "",
            "WARNING: Retrying ... NewConnectionError ...\nERROR: No matching distribution",
        )

    monkeypatch.setattr(build_addon.subprocess, "run", fake_run)
    with pytest.raises(build_addon.WheelFetchError) as info:
        build_addon.fetch_pyzmq_wheel("27.3.0", "3.11", "linux-x64", cache_dir=tmp_path)
    assert info.value.network
    assert "could not be reached" in str(info.value) and "3.11" in str(info.value)


@pytest.mark.skipif(importlib.util.find_spec("bpy") is None, reason="bpy is not installed")
def test_zip_installs_as_an_extension(built, tmp_path):
    """Blender's own installer (bpy's extensions operator) in a throw-away user directory:
    the wheels are set up, ``import shared_protocol`` works, the add-on registers and creates
    an armature, and per-user data goes to the extension's user directory. The zip for 5.1
    and later is refused by this Blender (4.5), by its version."""
    code = textwrap.dedent(
        """
        import os, sys
        import bpy
        bpy.ops.wm.read_factory_settings(use_empty=True)
        result = bpy.ops.extensions.package_install_files(
            filepath=sys.argv[1], repo="user_default", enable_on_install=True)
        assert result == {"FINISHED"}, result
        assert "bl_ext.user_default.chatpose" in bpy.context.preferences.addons
        import shared_protocol
        local = os.path.join(bpy.utils.user_resource("EXTENSIONS"), ".local")
        assert shared_protocol.__file__.startswith(local), shared_protocol.__file__
        assert any(os.path.isdir(os.path.join(d, "zmq")) for d, _, _ in os.walk(local))
        from bl_ext.user_default.chatpose import preferences
        data_dir = preferences.user_data_dir()
        assert os.sep + ".user" + os.sep in data_dir and os.path.isdir(data_dir), data_dir
        assert bpy.ops.chatpose.create_armature() == {"FINISHED"}
        assert len(bpy.context.active_object.data.bones) == 24
        # An update in this Blender (a newer zip's wheel installed over this one) runs on
        # the new shared_protocol's files, not on the module imported before: enabling
        # imports it afresh.
        import addon_utils
        shared_protocol.IMPORTED_BEFORE = True
        addon_utils.disable("bl_ext.user_default.chatpose", default_set=True)
        addon_utils.enable("bl_ext.user_default.chatpose", default_set=True)
        assert not hasattr(sys.modules["shared_protocol"], "IMPORTED_BEFORE")
        bpy.ops.extensions.package_install_files(
            filepath=sys.argv[2], repo="user_default", enable_on_install=True)
        assert addon_utils.check_extension("bl_ext.user_default.chatpose")  # still the first
        # Another extension's wheel with a package of the same name, synced into the
        # extensions' shared folder after this one's (at Blender's start), replaces its files:
        # named when registering, not run on a mix of two vendors' code.
        with open(sys.modules["shared_protocol"].__file__, "a") as stream:
            stream.write("\\n# another vendor's\\n")
        chatpose = sys.modules["bl_ext.user_default.chatpose"]
        from bl_ext.user_default.chatpose.core import install_check
        folder = os.path.dirname(chatpose.__file__)
        print("REFUSED:", install_check.shadowed_shared_protocol(chatpose.__package__, folder))
        print("INSTALLED-OK")
        """
    )
    home = tmp_path / "home"
    home.mkdir()
    env = dict(os.environ, BLENDER_USER_RESOURCES=str(home), HOME=str(home))
    proc = subprocess.run(
        [sys.executable, "-c", code, str(built.zips[OLD]), str(built.zips[NEW])],
        capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert "INSTALLED-OK" in proc.stdout, proc.stdout + proc.stderr
    assert "doesn't meet the minimum supported version (5.1.0)" in proc.stdout + proc.stderr
    refusal = proc.stdout.split("REFUSED: ")[1]
    assert "shared_protocol files were changed since it was installed" in refusal
    assert "(shared_protocol/__init__.py): another extension" in refusal


@pytest.mark.parametrize("kind", ["pip", "a-bare-folder", "a-checkout"])
def test_an_older_shared_protocol_in_blenders_python_is_named_not_used(built, tmp_path, kind):
    """A copy pip-installed into Blender's own Python (as a legacy install has it), or a
    folder on PYTHONPATH, comes before the extension's wheels on sys.path: the add-on ran on
    its old code, unseen."""
    stale = tmp_path / "site-packages"
    (stale / "shared_protocol").mkdir(parents=True)
    (stale / "shared_protocol" / "__init__.py").write_text('__version__ = "0.0.1"\n')
    if kind == "a-checkout":  # Blender started in a clone of the project (its folder on the path)
        (stale / "pyproject.toml").write_text("[project]\nname = 'chatpose-blender'\n")
    if kind == "pip":
        dist_info = stale / "chatpose_shared_protocol-0.0.1.dist-info"
        dist_info.mkdir()
        (dist_info / "METADATA").write_text(
            "Metadata-Version: 2.1\nName: chatpose-shared-protocol\nVersion: 0.0.1\n"
        )
    code = textwrap.dedent(
        """
        import sys
        import bpy
        bpy.ops.wm.read_factory_settings(use_empty=True)
        try:
            bpy.ops.extensions.package_install_files(
                filepath=sys.argv[1], repo="user_default", enable_on_install=True)
        except RuntimeError as exc:  # what Blender shows the user
            print("REFUSED:", exc)
        enabled = "bl_ext.user_default.chatpose" in bpy.context.preferences.addons
        print("ENABLED" if enabled else "NOT-ENABLED")
        """
    )
    home = tmp_path / "home"
    home.mkdir()
    env = dict(os.environ, BLENDER_USER_RESOURCES=str(home), HOME=str(home), PYTHONPATH=str(stale))
    proc = subprocess.run(
        [sys.executable, "-c", code, str(built.zips[OLD])],
        capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    output = proc.stdout + proc.stderr
    assert "NOT-ENABLED" in proc.stdout, output
    refusal = proc.stdout.split("REFUSED: ")[1]
    if kind == "a-checkout":
        assert f"imports the one of a source checkout, {stale}, which is on its path" in refusal
        return
    assert "but Blender's Python imports another copy, from " + str(stale) in refusal, output
    assert "-m pip uninstall chatpose-shared-protocol` if pip installed it), then" in refusal


@pytest.mark.skipif(importlib.util.find_spec("bpy") is None, reason="bpy is not installed")
def test_legacy_zip_installs_as_a_legacy_addon(built, tmp_path):
    """Blender's legacy installer; shared_protocol comes from this environment, as it must come
    from Blender's Python for a legacy install."""
    code = textwrap.dedent(
        """
        import sys
        import bpy
        import addon_utils
        bpy.ops.wm.read_factory_settings(use_empty=True)
        assert bpy.ops.preferences.addon_install(filepath=sys.argv[1]) == {"FINISHED"}
        assert addon_utils.enable("chatpose", default_set=True) is not None
        assert bpy.ops.chatpose.create_armature() == {"FINISHED"}
        addon_utils.disable("chatpose", default_set=True)
        print("LEGACY-OK")
        """
    )
    home = tmp_path / "home"
    home.mkdir()
    env = dict(os.environ, BLENDER_USER_RESOURCES=str(home), HOME=str(home))
    proc = subprocess.run(
        [sys.executable, "-c", code, str(built.legacy_zip_path)],
        capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert "LEGACY-OK" in proc.stdout, proc.stdout + proc.stderr


def fake_blender(directory, exit_code: int, output: str):
    """A `blender` executable that records its arguments and answers like the validator."""
    script = directory / "blender"
    script.write_text(
        "#!/bin/sh\n"
        f'printf "%s\\n" "$@" > "{directory}/argv"\n'
        f"echo '{output}'\n"
        f"exit {exit_code}\n"
    )
    script.chmod(0o755)
    return script


def test_a_blender_on_path_validates_the_zip(tmp_path, monkeypatch):
    zip_path = tmp_path / "chatpose-0.0.0.zip"
    zip_path.write_bytes(b"PK")
    blender = fake_blender(tmp_path, 0, "Success parsing TOML")
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert build_addon.blender_validate(zip_path) == f"{blender} --command extension validate"
    argv = (tmp_path / "argv").read_text().split("\n")[:-1]
    assert argv == ["--factory-startup", "--command", "extension", "validate", str(zip_path)]

    fake_blender(tmp_path, 1, "Error: manifest: missing key tagline")
    with pytest.raises(build_addon.BuildError, match="missing key tagline"):
        build_addon.blender_validate(zip_path)
    fake_blender(tmp_path, 0, "Error: manifest: missing key tagline")  # and exit 0
    with pytest.raises(build_addon.BuildError, match="missing key tagline"):
        build_addon.blender_validate(zip_path)
    # A folder named for errors is not one: the validator echoes the zip's path.
    (tmp_path / "mirror_errors").mkdir()
    zip_path = zip_path.rename(tmp_path / "mirror_errors" / zip_path.name)
    fake_blender(tmp_path, 0, f"Success parsing TOML in {zip_path}")
    assert build_addon.blender_validate(zip_path).endswith("--command extension validate")
