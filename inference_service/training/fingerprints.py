"""What a run records to know its data and its base again on `--resume`: hashes of the
examples (per data file, to say which one changed) and of the base checkpoint's files."""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from inference_service.checkpoint import CONFIG_NAME, Checkpoint
from inference_service.training.datasets import Example, image_sha256


def fingerprint(examples: Sequence[Example]) -> tuple[str, list[list]]:
    """A hash of every example's content, which resume compares (different data, or the same
    in another order, would make another run); and for each data file in turn, [its path as
    given, its examples, their hash], from which a refused resume says which file differs."""
    digest = hashlib.sha256()
    files: dict[str, list] = {}  # by path: [examples, their digest]
    for example in examples:
        parts = [example.kind, example.question, example.answer]
        parts += [f"{t.user}\x00{t.assistant}" for t in example.history]
        content = ["\x1f".join(parts).encode("utf-8")]
        content += [image_sha256(image) for image in example.images]
        content += [np.ascontiguousarray(p, dtype=np.float64).tobytes() for p in example.poses]
        content.append(b"\x1e")
        path = example.source.rsplit("#", 1)[0] or "examples from no file"
        file = files.setdefault(path, [0, hashlib.sha256()])
        file[0] += 1
        for chunk in content:
            digest.update(chunk)
            file[1].update(chunk)
    return digest.hexdigest(), [[n, count, d.hexdigest()] for n, (count, d) in files.items()]


def data_change(then: list[list], now: list[list]) -> str:
    """How the data files `now` (`fingerprint`'s second part) differ from those of the run,
    named by the run's paths: files are told apart by their content, a changed one found by
    its path, or by its name when given from another folder."""
    order = ", ".join(path for path, _, _ in then)
    gone = Counter(f[2] for f in then) - Counter(f[2] for f in now)
    new = Counter(f[2] for f in now) - Counter(f[2] for f in then)
    if not gone and not new:
        return f"the same examples in another order: give --data in the run's order ({order})"
    paths_now = {f[0] for f in now}
    # A file left out before one whose path is still given (two of the same content).
    for path, count, digest in sorted(then, key=lambda f: f[0] in paths_now):
        if not gone[digest]:
            continue
        gone[digest] -= 1
        changed = [f for f in now if new[f[2]] and f[0] == path] or [
            f for f in now if new[f[2]] and Path(f[0]).name == Path(path).name
        ]
        if not changed:
            return f"{path} ({_examples(count)}) is no longer among them"
        if changed[0][1] != count:
            return f"{path} gives {_examples(changed[0][1])}, and gave {count:,}"
        return f"{path}'s examples changed"
    paths_then = {f[0] for f in then}
    added = next(f[0] for f in sorted(now, key=lambda f: f[0] in paths_then) if new[f[2]])
    return f"{added} was not among them"


def _examples(count: int) -> str:
    return f"{count:,} example{'' if count == 1 else 's'}"


def base_fingerprint(checkpoint: Checkpoint) -> str:
    """A hash of the base checkpoint's chatpose.json and of the names and sizes of the files it
    loads from: the same base moved to another folder (another machine) is recognised by it,
    cheaply. Only those files: a run's own checkpoints may be in the base's folder."""
    digest = hashlib.sha256((checkpoint.root / CONFIG_NAME).read_bytes())
    for path in _loaded_files(checkpoint):
        digest.update(f"{path.name}\x1f{path.stat().st_size}\x1e".encode())
    return digest.hexdigest()


def _loaded_files(checkpoint: Checkpoint) -> list[Path]:
    """The files the base checkpoint loads from: the model's folder (its own files, not those
    of folders in it), the head, the adapter's."""
    files = sorted(p for p in checkpoint.base_dir.iterdir() if p.is_file())
    files.append(checkpoint.head_path)
    if checkpoint.adapter_dir is not None:
        files += sorted(p for p in checkpoint.adapter_dir.iterdir() if p.is_file())
    return files


def base_weights_sample(checkpoint: Checkpoint) -> str:
    """A hash of samples of the weight files the base loads from (16 blocks of 64 KiB across
    each, the first holding a safetensors header): its model's, its head and its adapter.
    Another model of the same layout and sizes (another seed, a fine-tune saved over it)
    differs in it, and it reads in milliseconds however large the model. Only those files: a
    run's own checkpoints may be in the base's folder."""
    digest = hashlib.sha256()
    for path in _loaded_files(checkpoint):
        if path.suffix not in (".safetensors", ".bin"):
            continue
        size = path.stat().st_size
        digest.update(f"{path.name}\x1f{size}\x1e".encode())
        with path.open("rb") as file:
            for block in range(16):
                file.seek(size * block // 16)
                digest.update(file.read(1 << 16))
    return digest.hexdigest()
