"""The scheduler's Backend over a ChatPoseModel: protocol-shaped work in, `Pose` values out.

Pose mode takes the prompt and images (history is context for chat, not for the forced pose
answer); chat mode passes the history on, paired into the model's (user, assistant) turns.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from shared_protocol.pose import Pose
from shared_protocol.protocol import Turn

from .errors import ChatPoseError, UnsupportedInputError
from .modeling_chatpose import DEFAULT_MAX_NEW_TOKENS, ChatPoseModel, PosePrompt
from .prompts import POSE_MARKER, Exchange, pose_exchange
from .scheduler import Answer, ModelInfo, WorkItem


def paired_turns(history: Sequence[Turn]) -> tuple[Exchange, ...]:
    """The wire's role/text turns as the model's (user, assistant) exchanges."""
    if len(history) % 2:
        raise UnsupportedInputError(
            f"history: expected user/assistant pairs, got an odd number of turns ({len(history)})"
        )
    pairs = []
    for i in range(0, len(history), 2):
        user, assistant = history[i], history[i + 1]
        if (user.role, assistant.role) != ("user", "assistant"):
            raise UnsupportedInputError(
                f"history[{i}], history[{i + 1}]: expected roles user then assistant, "
                f"got {user.role} then {assistant.role}"
            )
        pairs.append(Exchange(user.text, assistant.text))
    return tuple(pairs)


class ModelBackend:
    def __init__(
        self, model: ChatPoseModel, name: str, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    ):
        self.model = model
        self.max_new_tokens = max_new_tokens
        self.info = ModelInfo(
            # A folder name in another encoding than the system's holds lone surrogates,
            # which no reply can carry: written out instead.
            model=name.encode("utf-8", "backslashreplace").decode("utf-8"),
            device=str(model.device),
            dtype=str(model.dtype).removeprefix("torch."),
            supports_images=model.config.max_images > 0,
            max_images=model.config.max_images,
        )

    @classmethod
    def from_checkpoint(cls, path: str | Path, **options) -> ModelBackend:
        max_new_tokens = options.pop("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
        model = ChatPoseModel.from_checkpoint(path, refuse_guesses=True, **options)
        return cls(model, Path(path).resolve().name, max_new_tokens)

    def answer_poses(self, items: Sequence[WorkItem]) -> list[Answer | ChatPoseError]:
        """One pass over the items; a prompt the model knows no word of is refused on its own
        (`check_known_words`), so that a batch file's unknown line does not send every line
        of its micro-batch through the scheduler's one-by-one retry."""
        refused: dict[int, ChatPoseError] = {}
        for k, item in enumerate(items):
            if not item.images:
                try:
                    self.model.check_known_words(item.prompt, "prompt")
                except ChatPoseError as exc:
                    refused[k] = exc
        asked = [item for k, item in enumerate(items) if k not in refused]
        poses = iter(
            self.model.predict_poses([PosePrompt(i.prompt or None, i.images) for i in asked])
        )
        answers: list[Answer | ChatPoseError] = []
        for k, item in enumerate(items):
            if k in refused:
                answers.append(refused[k])
                continue
            pose = Pose(next(poses), label=item.prompt or None)
            answers.append(Answer(self._forced_answer(item), (pose,)))
        return answers

    def _forced_answer(self, item: WorkItem) -> str:
        """The answer the fast path teacher-forces, as the reply text."""
        wording = self.model.config.prompt_wording
        return pose_exchange(item.prompt, bool(item.images), POSE_MARKER, wording)[1]

    def answer_chat(self, item: WorkItem, stop: Callable[[], bool] | None = None) -> Answer:
        reply = self.model.chat(
            item.prompt, item.images, paired_turns(item.history), self.max_new_tokens, stop=stop
        )
        poses = tuple(Pose(pose) for pose in reply.poses)
        return Answer(reply.text, poses, reply.truncated, 2 * reply.exchanges_left_out)
