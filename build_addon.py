#!/usr/bin/env python3
"""Build the ChatPose Blender extension: ``dist/chatpose-<version>-blender-4.2-5.0.zip`` and
``dist/chatpose-<version>-blender-5.1.zip``.

    python build_addon.py [--output-dir DIR] [--update-manifest] [--no-legacy] [--no-validate]

Each zip is a Blender extension (drag and drop it into Blender), one per Python that Blender
releases ship: 3.11 in Blender 4.2-5.0, 3.13 in 5.1 and later. One zip cannot serve both:
Blender reads an extension's Python versions off its wheels' names, and cp311 wheels next to
stable-ABI ones read as "3.11 only", which Blender 5.1+ refuses. Each zip holds

- the add-on (``blender_addon/``: ``blender_manifest.toml`` at the zip's root, as Blender's own
  ``extension build`` writes it),
- ``wheels/chatpose_shared_protocol-<version>+<hash>-py3-none-any.whl``: the repository's
  numpy-only ``shared_protocol`` package, built here as a pure-Python wheel, so that ``import
  shared_protocol`` works inside Blender; ``<hash>`` is of its files, because Blender skips a
  wheel whose name and version it has installed already (a build of the same version with
  other code would keep the old package),
- ``wheels/pyzmq-*.whl`` for every platform (linux-x64, linux-arm64, windows-x64,
  windows-arm64, macos-arm64, macos-x64) for its Python, of the pyzmq version the manifest
  lists. They are fetched with ``pip download`` once and cached under ``build/wheels-cache/``,

with its own manifest: the repository's, its wheels narrowed to that Python plus the
shared_protocol wheel, and its Blender versions set; and nothing of ``inference_service``. The
manifest in ``blender_addon/`` lists the pyzmq wheels of both Pythons; the build fails when
that list differs from the wheels it bundles (``--update-manifest`` rewrites it). After
writing, each archive is checked (manifest keys, version = pyproject's, Blender versions,
every listed wheel in the zip and for its Python, a pyzmq wheel for every platform, no
inference_service files) and, when a ``blender`` binary is on PATH, validated with ``blender
--command extension validate`` (else with the validator bundled in the ``bpy`` module, when
that is installed).

It also writes ``dist/chatpose-<version>-legacy.zip`` (a ``chatpose/`` folder for Blender's
legacy add-on installer; it needs shared_protocol and pyzmq installed into Blender's Python) and
the shared_protocol wheel next to it. Standard library only.
"""

from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import importlib.metadata
import importlib.util
import io
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent
ADDON_DIR = ROOT / "blender_addon"
SHARED_DIR = ROOT / "shared_protocol"
MANIFEST_PATH = ADDON_DIR / "blender_manifest.toml"
LICENSE_PATH = ROOT / "LICENSE"
PYPROJECT_PATH = ROOT / "pyproject.toml"
DIST_DIR = ROOT / "dist"
CACHE_DIR = ROOT / "build" / "wheels-cache"

ADDON_ID = "chatpose"
SHARED_DIST = "chatpose_shared_protocol"


@dataclass(frozen=True)
class BlenderReleases:
    """Blender releases sharing one Python: one zip for them."""

    python: str
    blender_min: str
    blender_max: str | None  # the first release not served, as the manifest's max means it
    label: str  # in the zip's name


RELEASES = (
    BlenderReleases("3.11", "4.2.0", "5.1.0", "blender-4.2-5.0"),
    BlenderReleases("3.13", "5.1.0", None, "blender-5.1"),
)
PYTHON_VERSIONS = tuple(r.python for r in RELEASES)
# Blender platform -> pip --platform tags accepted for it (Blender 4.2+ needs glibc 2.28 and
# macOS 11.2, so wheels for those or older systems).
PLATFORM_TAGS = {
    "linux-x64": tuple(f"manylinux_2_{n}_x86_64" for n in range(28, 16, -1))
    + ("manylinux2014_x86_64",),
    "windows-x64": ("win_amd64",),
    "macos-arm64": ("macosx_11_0_arm64",),
    "macos-x64": ("macosx_11_0_x86_64",),
    "linux-arm64": tuple(f"manylinux_2_{n}_aarch64" for n in range(28, 16, -1))
    + ("manylinux2014_aarch64",),
    "windows-arm64": ("win_arm64",),
}
REQUIRED_MANIFEST_KEYS = (
    "schema_version",
    "id",
    "version",
    "name",
    "tagline",
    "maintainer",
    "type",
    "blender_version_min",
    "license",
    "platforms",
    "wheels",
    "permissions",
)
ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # fixed timestamps: the same sources give the same zip
SKIP_PARTS = {"__pycache__", ".pytest_cache", ".ruff_cache", "wheels"}
# What the sources are made of; anything else in their folders (an editor's `panel.py~`, a
# merge's `.orig`, notes) is left out of the zip.
SHIPPED_SUFFIXES = {".py", ".toml", ".md"}
NETWORK_MARKERS = (
    "NewConnectionError",
    "Failed to establish a new connection",
    "Temporary failure in name resolution",
    "Name or service not known",
    "nodename nor servname",
    "Network is unreachable",
    "ConnectTimeout",
    "Read timed out",
    "ProxyError",
    "Max retries exceeded",
    "Could not fetch URL",
    "No route to host",
    "Connection refused",
)


class BuildError(Exception):
    """The build cannot go on; the message says what to do."""


class WheelFetchError(BuildError):
    """A wheel could not be downloaded. ``network`` is True when pip could not reach the index."""

    def __init__(self, message: str, network: bool):
        super().__init__(message)
        self.network = network


@dataclass(frozen=True)
class BuildResult:
    zips: dict[BlenderReleases, Path]  # in RELEASES' order
    legacy_zip_path: Path | None
    shared_wheel_path: Path
    validation: str  # what validated the zips with Blender's validator, or why nothing did


# --- versions ------------------------------------------------------------------------------


def project_version() -> str:
    with open(PYPROJECT_PATH, "rb") as f:
        return tomllib.load(f)["project"]["version"]


def shared_protocol_version() -> str:
    text = (SHARED_DIR / "__init__.py").read_text(encoding="utf-8")
    match = re.search(r"^__version__\s*=\s*[\"']([^\"']+)[\"']", text, re.MULTILINE)
    if match is None:
        raise BuildError("shared_protocol/__init__.py has no __version__")
    return match.group(1)


def manifest_pyzmq_version() -> str:
    """The pyzmq version the manifest ships: the one source of truth for what goes in the zip,
    whatever pyzmq this Python happens to have (`--pyzmq-version X --update-manifest` moves it)."""
    text = MANIFEST_PATH.read_text("utf-8")
    versions = set(re.findall(r"\./wheels/pyzmq-([^-]+)-", text))
    if len(versions) != 1:
        raise BuildError(
            f"{MANIFEST_PATH} should list pyzmq wheels of exactly one version, found "
            f"{sorted(versions) or 'none'}; pass --pyzmq-version X --update-manifest"
        )
    return versions.pop()


# --- zip helpers ---------------------------------------------------------------------------


def _zip_write(zf: zipfile.ZipFile, name: str, data: bytes) -> None:
    info = zipfile.ZipInfo(name, ZIP_DATE)
    info.external_attr = 0o644 << 16
    stored = name.endswith(".whl")  # already compressed
    info.compress_type = zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED
    zf.writestr(info, data)


def _source_files(directory: Path, skip_names: Iterable[str] = ()) -> list[tuple[str, Path]]:
    """(relative posix path, path) of the files to ship from ``directory``, sorted."""
    skip = set(skip_names)
    files = []
    for path in sorted(directory.rglob("*")):
        rel = path.relative_to(directory)
        if not path.is_file() or rel.as_posix() in skip:
            continue
        if any(part in SKIP_PARTS or part.startswith(".") for part in rel.parts):
            continue
        if path.suffix not in SHIPPED_SUFFIXES:
            continue
        files.append((rel.as_posix(), path))
    return files


# --- the shared_protocol wheel ---------------------------------------------------------------


def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
    return "sha256=" + digest.decode("ascii")


def shared_wheel_name(version: str) -> str:
    return f"{SHARED_DIST}-{version}-py3-none-any.whl"


def shared_wheel_version(version: str, members: Sequence[tuple[str, bytes]]) -> str:
    """``version`` with a local label hashing the wheel's files (PEP 440: ``0.1.0+1a2b3c4d5e``):
    Blender installs a wheel only when no wheel of that name and version is installed, so a
    rebuild with other code must have another version."""
    digest = hashlib.sha256()
    for name, data in sorted(members):
        digest.update(f"{name}\0{len(data)}\0".encode())
        digest.update(data)
    return f"{version}+{digest.hexdigest()[:10]}"


def build_shared_protocol_wheel(out_dir: Path, version: str) -> Path:
    """A pure-Python wheel of ``shared_protocol`` (its .py files and PROTOCOL.md), versioned
    ``shared_wheel_version``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    members: list[tuple[str, bytes]] = [
        (f"shared_protocol/{rel}", path.read_bytes())
        for rel, path in _source_files(SHARED_DIR)
        if rel.endswith(".py") or rel == "PROTOCOL.md"
    ]
    if not any(name == "shared_protocol/__init__.py" for name, _ in members):
        raise BuildError(f"{SHARED_DIR} has no __init__.py")
    version = shared_wheel_version(version, members)
    dist_info = f"{SHARED_DIST}-{version}.dist-info"
    metadata = (
        "Metadata-Version: 2.1\n"
        "Name: chatpose-shared-protocol\n"
        f"Version: {version}\n"
        "Summary: ChatPose protocol, SMPL skeleton, rotations and poses (numpy only)\n"
        "License: MIT\n"
        "Requires-Python: >=3.11\n"
        "Requires-Dist: numpy>=1.24\n"
        "Requires-Dist: pyzmq>=25; extra == 'client'\n"
        "Provides-Extra: client\n"
    )
    wheel = (
        "Wheel-Version: 1.0\n"
        "Generator: chatpose build_addon.py\n"
        "Root-Is-Purelib: true\n"
        "Tag: py3-none-any\n"
    )
    members += [
        (f"{dist_info}/METADATA", metadata.encode()),
        (f"{dist_info}/WHEEL", wheel.encode()),
        (f"{dist_info}/top_level.txt", b"shared_protocol\n"),
    ]
    record = io.StringIO()
    writer = csv.writer(record, lineterminator="\n")
    for name, data in members:
        writer.writerow([name, _record_hash(data), len(data)])
    writer.writerow([f"{dist_info}/RECORD", "", ""])
    members.append((f"{dist_info}/RECORD", record.getvalue().encode()))

    path = out_dir / shared_wheel_name(version)
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members:
            _zip_write(zf, name, data)
    return path


# --- pyzmq wheels ----------------------------------------------------------------------------


def _cached_wheel(directory: Path, version: str) -> Path | None:
    found = sorted(directory.glob(f"pyzmq-{version}-*.whl")) if directory.is_dir() else []
    return found[0] if found else None


def fetch_pyzmq_wheel(
    version: str, python: str, platform: str, cache_dir: Path = CACHE_DIR
) -> Path:
    """The pyzmq wheel for one Python and Blender platform, from the cache or ``pip download``."""
    target_dir = cache_dir / f"py{python}-{platform}"
    cached = _cached_wheel(target_dir, version)
    if cached is not None:
        return cached
    command = [
        sys.executable, "-m", "pip", "download",
        "--only-binary=:all:", "--no-deps", "--disable-pip-version-check",
        "--retries", "2", "--timeout", "30",
        "--implementation", "cp", "--python-version", python,
        *(arg for tag in PLATFORM_TAGS[platform] for arg in ("--platform", tag)),
        f"pyzmq=={version}",
    ]  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="chatpose-wheels-") as tmp:
        try:
            proc = subprocess.run(
                [*command, "-d", tmp],
                capture_output=True,
                encoding="utf-8",
                errors="replace",
                timeout=600,
            )
        except subprocess.TimeoutExpired:
            raise WheelFetchError(
                f"pip download of pyzmq=={version} for Python {python} on {platform} timed out",
                network=True,
            ) from None
        output = proc.stdout + proc.stderr
        wheel = _cached_wheel(Path(tmp), version)
        if proc.returncode != 0 or wheel is None:
            network = any(marker in output for marker in NETWORK_MARKERS)
            reason = "the package index could not be reached" if network else "pip failed"
            tail = "\n".join(output.strip().splitlines()[-8:])
            raise WheelFetchError(
                f"cannot fetch the pyzmq=={version} wheel for Python {python} on {platform}: "
                f"{reason}.\nCommand: {' '.join(command)}\n{tail}\n"
                f"Fix the network or pip's index settings, or put the wheel into "
                f"{target_dir}/ by hand.",
                network=network,
            )
        target_dir.mkdir(parents=True, exist_ok=True)
        destination = target_dir / wheel.name
        shutil.copyfile(wheel, destination)
        return destination


# The tag a Mac wheel gets for one architecture (arm64 Macs start at macOS 11).
MAC_TAGS = {"macos-arm64": "macosx_11_0_arm64", "macos-x64": "macosx_10_15_x86_64"}


def one_mac_wheel(wheel: Path, platform: str, out_dir: Path) -> Path:
    """A copy of the universal2 ``wheel`` tagged for the one Mac ``platform`` ("macos-arm64",
    "macos-x64"): Blender 4.2.0 installs a macOS wheel only when its tag ends in the
    machine's own architecture. Its binaries, which hold both, run there. Other wheels are
    returned as they are."""
    tags = _wheel_tags(wheel.name)
    if tags is None or not tags[4].endswith("_universal2"):
        return wheel
    tag = MAC_TAGS[platform]
    thin = out_dir / f"{'-'.join(tags[:4])}-{tag}.whl"
    with zipfile.ZipFile(wheel) as source:
        members = {name: source.read(name) for name in source.namelist()}
    (meta,) = [n for n in members if n.endswith(".dist-info/WHEEL")]
    members[meta] = re.sub(
        rb"^(Tag: [^-\s]+-[^-\s]+-)\S+$", rb"\g<1>" + tag.encode(), members[meta], flags=re.M
    )
    record = meta.removesuffix("WHEEL") + "RECORD"
    rows = list(csv.reader(io.StringIO(members[record].decode("utf-8"))))
    for row in rows:
        if row and row[0] == meta:
            row[1:] = [_record_hash(members[meta]), str(len(members[meta]))]
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows(rows)
    members[record] = text.getvalue().encode("utf-8")
    with zipfile.ZipFile(thin, "w") as out:
        for name, data in members.items():
            _zip_write(out, name, data)
    return thin


def fetch_pyzmq_wheels(version: str, cache_dir: Path = CACHE_DIR) -> dict[tuple[str, str], Path]:
    """(python, platform) -> wheel, for every supported Python and platform."""
    return {
        (python, platform): fetch_pyzmq_wheel(version, python, platform, cache_dir)
        for python in PYTHON_VERSIONS
        for platform in PLATFORM_TAGS
    }


# --- wheel compatibility (the subset of Blender's rules that matters here) -------------------


def _wheel_tags(filename: str) -> tuple[str, str, str, str, str] | None:
    """(distribution, version, python tag, abi tag, platform tag) or None."""
    if not filename.endswith(".whl"):
        return None
    parts = filename[:-4].split("-")
    if not 5 <= len(parts) <= 6:
        return None
    return parts[0], parts[1], parts[-3], parts[-2], parts[-1]


def _python_ok(python_tags: str, abi: str, python: str) -> bool:
    major, minor = (int(x) for x in python.split("."))
    for tag in python_tags.split("."):
        digits = tag[2:]
        if tag[:2] not in {"cp", "py"} or not digits.isdigit():
            continue
        if len(digits) == 1:
            if int(digits) == major:
                return True
            continue
        tag_version = (int(digits[0]), int(digits[1:]))
        if tag_version == (major, minor):
            return True
        if abi == "abi3" and tag_version[0] == major and tag_version <= (major, minor):
            return True
    return False


def _platform_ok(platform_tags: str, platform: str) -> bool:
    linux_arch = {"linux-x64": "_x86_64", "linux-arm64": "_aarch64"}.get(platform)
    windows_tag = {"windows-x64": "win_amd64", "windows-arm64": "win_arm64"}.get(platform)
    for tag in platform_tags.split("."):
        if tag == "any":
            return True
        if linux_arch and tag.startswith("manylinux") and tag.endswith(linux_arch):
            return True
        if tag == windows_tag:
            return True
        # Blender 4.2.0 takes no universal2 wheel (later releases do): `one_mac_wheel`.
        if platform.startswith("macos-") and tag.startswith("macosx_"):
            arch = "arm64" if platform == "macos-arm64" else "x86_64"
            if tag.endswith("_" + arch):
                return True
    return False


def wheel_supports(filename: str, python: str, platform: str) -> bool:
    """Whether Blender on ``platform`` ("linux-x64", ...) with Python ``python`` ("3.11")
    would install this wheel."""
    tags = _wheel_tags(filename)
    if tags is None:
        return False
    _, _, python_tags, abi, platform_tags = tags
    return _python_ok(python_tags, abi, python) and _platform_ok(platform_tags, platform)


# --- manifest --------------------------------------------------------------------------------


def manifest_wheel_entries(wheel_names: Iterable[str]) -> list[str]:
    return [f"./wheels/{name}" for name in sorted(set(wheel_names))]


def update_manifest_wheels(manifest_text: str, entries: Sequence[str]) -> str:
    body = "".join(f'  "{entry}",\n' for entry in entries)
    new, count = re.subn(
        r"^wheels\s*=\s*\[.*?^\]", f"wheels = [\n{body}]", manifest_text, flags=re.M | re.S
    )
    if count != 1:
        raise BuildError(f"{MANIFEST_PATH}: no `wheels = [...]` block (one per line) to update")
    return new


def release_manifest(manifest_text: str, release: BlenderReleases, shared_wheel: str) -> str:
    """The repository's manifest narrowed to one zip: the pyzmq wheels for its Python and the
    shared_protocol wheel (file name ``shared_wheel``), its Blender versions."""
    entries = [
        entry
        for entry in tomllib.loads(manifest_text).get("wheels", [])
        if _serves(entry.rsplit("/", 1)[-1], release.python)
    ]
    entries = manifest_wheel_entries([*(e.rsplit("/", 1)[-1] for e in entries), shared_wheel])
    text = update_manifest_wheels(manifest_text, entries)
    versions = f'blender_version_min = "{release.blender_min}"\n'
    if release.blender_max:
        versions += f'blender_version_max = "{release.blender_max}"\n'
    text, count = re.subn(r'^blender_version_min = "[^"]*"\n', versions, text, flags=re.M)
    if count != 1:
        raise BuildError(f'{MANIFEST_PATH}: no `blender_version_min = "..."` line')
    return text


def _serves(wheel_name: str, python: str) -> bool:
    """Whether a wheel is for ``python`` on some platform (pure-Python ones are for all)."""
    return any(wheel_supports(wheel_name, python, platform) for platform in PLATFORM_TAGS)


def manifest_problems(
    manifest: dict, version: str, release: BlenderReleases | None = None
) -> list[str]:
    """What is wrong with a parsed manifest (an empty list when nothing is): the repository's
    (``release`` None: the wheels of every Python) or one zip's."""
    problems = [
        f"manifest: missing key {key!r}" for key in REQUIRED_MANIFEST_KEYS if key not in manifest
    ]
    if manifest.get("schema_version") != "1.0.0":
        problems.append(f"manifest: schema_version {manifest.get('schema_version')!r} != '1.0.0'")
    if manifest.get("id") != ADDON_ID:
        problems.append(f"manifest: id {manifest.get('id')!r} != {ADDON_ID!r}")
    if manifest.get("type") != "add-on":
        problems.append(f"manifest: type {manifest.get('type')!r} != 'add-on'")
    if manifest.get("version") != version:
        problems.append(
            f"manifest: version {manifest.get('version')!r} differs from pyproject's {version!r}"
        )
    want_min = release.blender_min if release else RELEASES[0].blender_min
    want_max = release.blender_max if release else None
    if manifest.get("blender_version_min") != want_min:
        problems.append(f"manifest: blender_version_min should be {want_min!r}")
    if manifest.get("blender_version_max") != want_max:
        problems.append(f"manifest: blender_version_max should be {want_max!r}")
    permissions = manifest.get("permissions", {})
    for key in ("network", "files"):
        if not isinstance(permissions, dict) or not isinstance(permissions.get(key), str):
            problems.append(f"manifest: permissions.{key} needs a reason")
    platforms = manifest.get("platforms", [])
    if sorted(platforms) != sorted(PLATFORM_TAGS):
        problems.append(f"manifest: platforms {platforms} != {sorted(PLATFORM_TAGS)}")
    wheels = manifest.get("wheels", [])
    names = [entry.rsplit("/", 1)[-1] for entry in wheels]
    for entry in wheels:
        if not entry.startswith("./wheels/") or _wheel_tags(entry.rsplit("/", 1)[-1]) is None:
            problems.append(f"manifest: wheel entry {entry!r} is not ./wheels/<name>.whl")
    shared = [n for n in names if n.startswith(f"{SHARED_DIST}-")]
    if release is None and shared:  # its version changes with its code: each zip's alone
        problems.append(f"manifest: {shared[0]} is listed; the build adds it to each zip")
    if release is not None and not (
        len(shared) == 1 and shared[0].startswith(f"{SHARED_DIST}-{version}+")
    ):
        problems.append(f"manifest: wheels list no one {SHARED_DIST}-{version}+<hash> wheel")
    zmq_versions = {t[1] for n in names if (t := _wheel_tags(n)) and t[0] == "pyzmq"}
    if len(zmq_versions) > 1:
        problems.append(f"manifest: pyzmq wheels of several versions {sorted(zmq_versions)}")
    pythons = (release.python,) if release else PYTHON_VERSIONS
    for platform in platforms:
        for python in pythons:
            if not any(
                n.startswith("pyzmq-") and wheel_supports(n, python, platform) for n in names
            ):
                problems.append(f"manifest: no pyzmq wheel for Python {python} on {platform}")
    if release is not None:  # another Python's wheel would change what Blender reads off them
        problems += [
            f"manifest: {n} is not for Python {release.python}"
            for n in names
            if not _serves(n, release.python)
        ]
    return problems


def _release_of(manifest: dict) -> BlenderReleases | None:
    return next((r for r in RELEASES if r.blender_min == manifest.get("blender_version_min")), None)


# --- the archives ----------------------------------------------------------------------------


def write_extension_zip(path: Path, wheels: Sequence[Path], manifest_text: str) -> None:
    """The add-on with ``manifest_text`` as its manifest and the wheels it lists."""
    listed = {entry.rsplit("/", 1)[-1] for entry in tomllib.loads(manifest_text)["wheels"]}
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        for rel, source in _source_files(ADDON_DIR):
            data = manifest_text.encode() if rel == MANIFEST_PATH.name else source.read_bytes()
            _zip_write(zf, rel, data)
        _zip_write(zf, LICENSE_PATH.name, LICENSE_PATH.read_bytes())  # MIT: with every copy
        for wheel in sorted({w.name: w for w in wheels}.values(), key=lambda p: p.name):
            if wheel.name in listed:
                _zip_write(zf, f"wheels/{wheel.name}", wheel.read_bytes())


def bl_info_version() -> str:
    """``bl_info["version"]`` of the add-on's ``__init__.py`` (what a legacy install shows),
    read from its text: importing it needs Blender's modules."""
    text = (ADDON_DIR / "__init__.py").read_text("utf-8")
    match = re.search(r'"version":\s*\((\d+),\s*(\d+),\s*(\d+)\)', text)
    if match is None:
        raise BuildError(f"{ADDON_DIR / '__init__.py'}: no bl_info version (a, b, c)")
    return ".".join(match.groups())


def write_legacy_zip(path: Path) -> None:
    """A ``chatpose/`` folder for Blender's legacy add-on installer (no manifest, no wheels)."""
    if bl_info_version() != project_version():
        raise BuildError(
            f"bl_info's version {bl_info_version()} differs from pyproject's {project_version()}"
        )
    with zipfile.ZipFile(path, "w") as zf:
        for rel, source in _source_files(ADDON_DIR, skip_names={MANIFEST_PATH.name}):
            _zip_write(zf, f"{ADDON_ID}/{rel}", source.read_bytes())
        _zip_write(zf, f"{ADDON_ID}/{LICENSE_PATH.name}", LICENSE_PATH.read_bytes())


def archive_problems(zip_path: Path, version: str | None = None) -> list[str]:
    """Checks a built extension zip: structure, manifest, wheels, no inference_service."""
    version = version or project_version()
    problems: list[str] = []
    try:
        zf = zipfile.ZipFile(zip_path)
    except (OSError, zipfile.BadZipFile) as exc:
        return [f"{zip_path}: not a readable zip ({exc})"]
    with zf:
        names = zf.namelist()
        for name in sorted({n for n in names if names.count(n) > 1}):
            problems.append(f"zip: {name} appears more than once")
        for required in ("blender_manifest.toml", "__init__.py"):
            if required not in names:
                problems.append(f"zip: no {required} at the root")
        if "blender_manifest.toml" not in names:
            return problems
        try:
            manifest = tomllib.loads(zf.read("blender_manifest.toml").decode("utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            return [*problems, f"manifest: not valid TOML ({exc})"]
        release = _release_of(manifest)
        if release is None:
            problems.append(
                f"manifest: blender_version_min {manifest.get('blender_version_min')!r} is "
                f"none of {[r.blender_min for r in RELEASES]}"
            )
        problems += manifest_problems(manifest, version, release)
        for entry in manifest.get("wheels", []):
            member = entry.removeprefix("./")
            if member not in names:
                problems.append(f"zip: listed wheel {member} is missing")
            else:
                problems += _wheel_member_problems(zf, member)
        listed = {entry.removeprefix("./") for entry in manifest.get("wheels", [])}
        for name in names:
            if name.startswith("wheels/") and name not in listed:
                problems.append(f"zip: {name} is not listed in the manifest")
        for name in names:
            if "inference_service" in name:
                problems.append(f"zip: contains {name} (inference_service must not ship)")
            if "__pycache__" in name or name.endswith(".pyc"):
                problems.append(f"zip: contains compiled file {name}")
    return problems


def _wheel_member_problems(zf: zipfile.ZipFile, member: str) -> list[str]:
    try:
        with zipfile.ZipFile(io.BytesIO(zf.read(member))) as wheel:
            inner = wheel.namelist()
    except zipfile.BadZipFile:
        return [f"zip: {member} is not a zip"]
    problems = []
    if not any(n.endswith(".dist-info/RECORD") for n in inner):
        problems.append(f"zip: {member} has no dist-info/RECORD")
    if any("inference_service" in n for n in inner):
        problems.append(f"zip: {member} contains inference_service files")
    if member.rsplit("/", 1)[-1].startswith(SHARED_DIST) and (
        "shared_protocol/__init__.py" not in inner
    ):
        problems.append(f"zip: {member} has no shared_protocol/__init__.py")
    return problems


# --- Blender's validator ---------------------------------------------------------------------


def _bundled_validator() -> tuple[Path, Path | None] | None:
    """blender_ext.py (and the tags file) from an installed ``bpy`` module, without importing it."""
    spec = importlib.util.find_spec("bpy")
    if spec is None or not spec.submodule_search_locations:
        return None
    for base in spec.submodule_search_locations:
        for script in sorted(Path(base).glob("*/scripts/addons_core/bl_pkg/cli/blender_ext.py")):
            scripts = script.parents[3]
            tags = scripts / "modules" / "_bpy_internal" / "extensions" / "tags.py"
            return script, tags if tags.is_file() else None
    return None


def blender_validate(zip_path: Path) -> str:
    """Runs Blender's extension validator on the zip; returns what ran. Raises BuildError when
    the validator rejects the zip."""
    blender = shutil.which("blender")
    if blender is not None:
        command = [
            blender,
            "--factory-startup",
            "--command",
            "extension",
            "validate",
            str(zip_path),
        ]
        used = f"{blender} --command extension validate"
    elif (bundled := _bundled_validator()) is not None:
        script, tags = bundled
        command = [sys.executable, str(script), "validate", str(zip_path)]
        if tags is not None:
            command.append(f"--valid-tags={tags}")
        used = f"bpy's bundled {script.name} validate"
    else:
        return "not validated by Blender: no `blender` on PATH and no bpy module installed"
    proc = subprocess.run(
        command, capture_output=True, encoding="utf-8", errors="replace", timeout=300
    )
    output = (proc.stdout + proc.stderr).strip()
    # Some validators say "Error" and exit 0; the zip's path, which they echo, may hold it too.
    said = output.replace(str(zip_path), "").lower()
    if proc.returncode != 0 or "error" in said:
        raise BuildError(f"{used} rejected {zip_path}:\n{output}")
    return used


# --- the build -------------------------------------------------------------------------------


def build(
    output_dir: Path = DIST_DIR,
    *,
    cache_dir: Path = CACHE_DIR,
    update_manifest: bool = False,
    pyzmq_version: str | None = None,
    legacy: bool = True,
    validate: bool = True,
) -> BuildResult:
    version = project_version()
    if shared_protocol_version() != version:
        raise BuildError(
            f"shared_protocol.__version__ {shared_protocol_version()!r} differs from "
            f"pyproject's {version!r}"
        )
    zmq_version = pyzmq_version or manifest_pyzmq_version()
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise BuildError(f"--output-dir {output_dir} is a file, not a folder")

    with tempfile.TemporaryDirectory(prefix="chatpose-build-") as tmp:
        shared_wheel = build_shared_protocol_wheel(Path(tmp), version)
        fetched = [
            one_mac_wheel(wheel, platform, Path(tmp)) if platform in MAC_TAGS else wheel
            for (_, platform), wheel in fetch_pyzmq_wheels(zmq_version, cache_dir).items()
        ]
        zmq_wheels = sorted({w.name: w for w in fetched}.values())
        wheels = [shared_wheel, *zmq_wheels]

        expected = manifest_wheel_entries(w.name for w in zmq_wheels)
        manifest_text = MANIFEST_PATH.read_text(encoding="utf-8")
        listed = tomllib.loads(manifest_text).get("wheels", [])
        if sorted(listed) != expected:
            if not update_manifest:
                raise BuildError(
                    f"{MANIFEST_PATH.relative_to(ROOT)} lists the wheels\n  "
                    + "\n  ".join(sorted(listed))
                    + "\nbut the build bundles\n  "
                    + "\n  ".join(expected)
                    + "\nRun `python build_addon.py --update-manifest` to rewrite the list."
                )
            MANIFEST_PATH.write_text(update_manifest_wheels(manifest_text, expected), "utf-8")
        problems = manifest_problems(tomllib.loads(MANIFEST_PATH.read_text("utf-8")), version)
        if problems:
            raise BuildError("\n".join(problems))

        manifest_text = MANIFEST_PATH.read_text("utf-8")
        zips = {}
        for release in RELEASES:
            zips[release] = output_dir / f"{ADDON_ID}-{version}-{release.label}.zip"
            manifest = release_manifest(manifest_text, release, shared_wheel.name)
            write_extension_zip(zips[release], wheels, manifest)
        shared_out = output_dir / shared_wheel.name
        for older in output_dir.glob(f"{SHARED_DIST}-*.whl"):  # an earlier build's: one is current
            older.unlink()
        shutil.copyfile(shared_wheel, shared_out)

    for zip_path in zips.values():
        problems = archive_problems(zip_path, version)
        if problems:
            raise BuildError(f"{zip_path} failed its checks:\n" + "\n".join(problems))
    legacy_path = None
    if legacy:
        legacy_path = output_dir / f"{ADDON_ID}-{version}-legacy.zip"
        write_legacy_zip(legacy_path)
    validation = "not validated (--no-validate)"
    if validate:
        validation = ", ".join(sorted({blender_validate(z) for z in zips.values()}))
    return BuildResult(zips, legacy_path, shared_out, validation)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", type=Path, default=DIST_DIR)
    parser.add_argument("--cache-dir", type=Path, default=CACHE_DIR)
    parser.add_argument(
        "--update-manifest",
        action="store_true",
        help="rewrite the manifest's wheels list to the wheels bundled",
    )
    parser.add_argument(
        "--pyzmq-version",
        help="the pyzmq to bundle (default: the manifest's; with --update-manifest it moves)",
    )
    parser.add_argument("--no-legacy", action="store_true", help="skip the legacy zip")
    parser.add_argument("--no-validate", action="store_true", help="skip Blender's validator")
    args = parser.parse_args(argv)
    try:
        result = build(
            args.output_dir,
            cache_dir=args.cache_dir,
            update_manifest=args.update_manifest,
            pyzmq_version=args.pyzmq_version,
            legacy=not args.no_legacy,
            validate=not args.no_validate,
        )
    except BuildError as exc:
        print(f"build_addon.py: error: {exc}", file=sys.stderr)
        return 1
    for release, zip_path in result.zips.items():
        upto = f"before {release.blender_max}" if release.blender_max else "and later"
        print(f"wrote {zip_path}  (Blender {release.blender_min} {upto})")
    if result.legacy_zip_path:
        print(f"wrote {result.legacy_zip_path}")
    print(f"wrote {result.shared_wheel_path}")
    print(f"validated: {result.validation}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
