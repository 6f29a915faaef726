"""Stand-ins behind the scheduler and server whose timing a test controls (`hold()`).

- `ScriptedBackend`: instant and scripted; each answer encodes its prompt.
- `HeldModelBackend`: the tiny real model (`ModelBackend`), behind the same gate.

Both tell a test what a prompt's answer must be (`expected_poses`), so one test can run on
either.
"""

from __future__ import annotations

import contextlib
import hashlib
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from inference_service.backend import ModelBackend
from inference_service.errors import BadImageError, UnsupportedInputError
from inference_service.scheduler import Answer, ModelInfo, WorkItem
from inference_service.server import CurveKeys, Server
from shared_protocol.pose import Pose

TIMEOUT_S = 10.0
# The scripted service in a process of its own: one a test can kill, and start again.
SCRIPTED_SERVER = Path(__file__).resolve().parent / "scripted_server.py"


def wait_until(predicate, timeout_s: float = TIMEOUT_S) -> None:
    """Polls ``predicate`` (state another thread changes) until it holds."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "gave up waiting"
        time.sleep(0.001)


def pose_for(prompt: str) -> Pose:
    """A pose that encodes its prompt, so a reply shows which request it answers: every joint
    turned by the prompt's length in hundredths of a radian, and the right hand (a leaf: no
    joint moves with it) by a hash of the whole prompt, so that prompts of one length ("run",
    "bow") differ too."""
    rotations = np.full((24, 3), (len(prompt) % 97) / 100.0)
    digest = hashlib.sha256(prompt.encode("utf-8", "surrogatepass")).digest()
    rotations[23] = np.frombuffer(digest[:3], np.uint8) / 255.0 - 0.5
    return Pose(rotations, label=prompt)


class Holdable:
    """A gate in front of the model: while held, work that reaches it waits for `release()`."""

    def __init__(self) -> None:
        self.batch_sizes: list[int] = []
        self._gate = threading.Event()
        self._gate.set()
        self.entered = threading.Event()  # set whenever work reaches the model

    def hold(self) -> None:
        self._gate.clear()

    def release(self) -> None:
        self._gate.set()

    def _enter(self, batch_size: int) -> None:
        self.batch_sizes.append(batch_size)
        self.entered.set()
        assert self._gate.wait(TIMEOUT_S)


class ScriptedBackend(Holdable):
    """Answers each prompt with `pose_for(prompt)`; 'explode' raises, 'rant' raises with a
    message longer than the protocol allows, 'zzxq' is a word it does not know, a 'corrupt'
    image is bad; in chat, 'ramble' is answered cut at the token limit before its pose."""

    info = ModelInfo("scripted", "cpu", "float32", supports_images=True, max_images=1)
    failing_prompt = "explode"  # a batch line the model fails on, and the error code it gets
    failing_code = "model_error"

    def expected_poses(self, prompt: str) -> tuple[Pose, ...]:
        return (pose_for(prompt),)

    def _run(self, item: WorkItem) -> Answer:
        if self.failing_prompt in item.prompt:
            raise RuntimeError("the model exploded")
        if "rant" in item.prompt:  # past the protocol's length, and not valid UTF-8 either
            raise RuntimeError("the model ranted about /models/\udcff: " + "on and on " * 7000)
        if item.prompt == "zzxq":  # as ChatPoseModel.check_known_words says it
            raise UnsupportedInputError("prompt: this model knows none of its words")
        if any(b"corrupt" in image for image in item.images):
            raise BadImageError("images[0]: not a PNG or JPEG image")
        return Answer(f"Sure, it is <POSE>. ({item.prompt})", (pose_for(item.prompt),))

    def answer_poses(self, items: Sequence[WorkItem]) -> list[Answer]:
        self._enter(len(items))
        return [self._run(item) for item in items]

    context_turns: int | None = None  # set: a chat's history past it is left out, as a model's

    def answer_chat(self, item: WorkItem, stop=None) -> Answer:
        self._enter(1)
        if "ramble" in item.prompt:
            return Answer("Well, a tired person would first", (), truncated=True)
        answer = self._run(item)
        seen = len(item.history) if self.context_turns is None else self.context_turns
        left_out = max(0, len(item.history) - seen)
        # Two people, each their own pose, so that a test sees which armature got which.
        poses = (*answer.poses, pose_for(f"{item.prompt} (second person)"))
        return Answer(f"Here you go: {answer.text}", poses, history_left_out=left_out)


class HeldModelBackend(Holdable):
    """The tiny LLaVA's `ModelBackend`, held like the scripted one."""

    failing_prompt = "a literal <image> marker"  # the model refuses text with its image marker
    failing_code = "unsupported_input"

    def __init__(self, model: ModelBackend) -> None:
        super().__init__()
        self.model = model
        self.info = model.info

    def expected_poses(self, prompt: str) -> tuple[Pose, ...]:
        return self.model.answer_poses([WorkItem(prompt)])[0].poses

    def answer_poses(self, items: Sequence[WorkItem]) -> list[Answer]:
        self._enter(len(items))
        return self.model.answer_poses(items)

    def answer_chat(self, item: WorkItem, stop=None) -> Answer:
        self._enter(1)
        return self.model.answer_chat(item, stop)


@contextlib.contextmanager
def curve_service(key_dir: Path, client: str = "animator") -> Iterator[str]:
    """A scripted service on loopback that lets in only the CURVE client ``client`` (keys made
    in ``key_dir``: ``{client}.key_secret``, ``server.key``); yields its address."""
    from inference_service.keys import make_keys

    make_keys(key_dir, [client])
    backend = ScriptedBackend()
    curve = CurveKeys(key_dir / "server.key_secret", key_dir / "authorized_clients")
    server = Server(backend, backend.info, "tcp://127.0.0.1:*", max_wait_ms=0, curve=curve)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.address
    finally:
        server.stop()
        thread.join(TIMEOUT_S)


def start_scripted_server(address: str, *extra: str) -> subprocess.Popen:
    """`scripted_server.py` serving at `address`, once it says it is ready."""
    process = subprocess.Popen(
        [sys.executable, str(SCRIPTED_SERVER), address, *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert process.stdout.readline().strip() == "ready"
    return process
