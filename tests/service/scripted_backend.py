"""A stand-in model for scheduler and server tests: instant, scripted, and holdable."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np

from inference_service.errors import BadImageError
from inference_service.scheduler import Answer, WorkItem
from shared_protocol.pose import Pose

TIMEOUT_S = 10.0


def pose_for(prompt: str) -> Pose:
    """A pose that encodes its prompt, so a reply shows which request it answers."""
    return Pose(np.full((24, 3), (len(prompt) % 97) / 100.0), label=prompt)


class ScriptedBackend:
    """Answers each prompt with `pose_for(prompt)`; 'explode' raises, a 'corrupt' image is bad."""

    def __init__(self) -> None:
        self.batch_sizes: list[int] = []
        self._gate = threading.Event()
        self._gate.set()
        self.entered = threading.Event()  # set whenever a batch reaches the model

    def hold(self) -> None:
        self._gate.clear()

    def release(self) -> None:
        self._gate.set()

    def _run(self, item: WorkItem) -> Answer:
        if "explode" in item.prompt:
            raise RuntimeError("the model exploded")
        if any(b"corrupt" in image for image in item.images):
            raise BadImageError("images[0]: not a PNG or JPEG image")
        return Answer(f"Sure, it is <POSE>. ({item.prompt})", (pose_for(item.prompt),))

    def answer_poses(self, items: Sequence[WorkItem]) -> list[Answer]:
        self.batch_sizes.append(len(items))
        self.entered.set()
        assert self._gate.wait(TIMEOUT_S)
        return [self._run(item) for item in items]

    def answer_chat(self, item: WorkItem) -> Answer:
        self.entered.set()
        assert self._gate.wait(TIMEOUT_S)
        answer = self._run(item)
        return Answer(f"Here you go: {answer.text}", answer.poses * 2)
