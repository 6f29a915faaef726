"""Prompt text: the llava_v1 conversation template and the pose questions and answers.

Pure Python, no tokenizer: this module only decides which string the model reads. The
conversation template is the release's; the pose questions are the paper's
(/work/shared/docs/chatpose-method.md, "Prompts"), or for a checkpoint converted from the
release its training code's (`WORDINGS`).

A conversation in llava_v1 reads

    {system} USER: {question} ASSISTANT: {answer}</s>USER: {question} ASSISTANT:

and with images the first user message starts with one image marker per image and a newline.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from shared_protocol.protocol import (
    POSE_MARKER,  # noqa: F401 - how replies write a pose token
    trimmed,
)

# The image's place in the text, one token per image (the checkpoints this project writes, as
# transformers' Llava reads them), and what wraps it with chatpose.json's mm_use_im_start_end.
IMAGE_TOKEN = "<image>"
IMAGE_WRAPPERS = ("<im_start>", "<im_end>")


@dataclass(frozen=True)
class ConversationTemplate:
    name: str
    system: str
    roles: tuple[str, str]
    sep: str  # after a user message (and after the system prompt)
    sep2: str  # after an assistant message: the end-of-sequence string


LLAVA_V1 = ConversationTemplate(
    name="llava_v1",
    system=(
        "A chat between a curious human and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the human's questions."
    ),
    roles=("USER", "ASSISTANT"),
    sep=" ",
    sep2="</s>",
)

TEMPLATES = {LLAVA_V1.name: LLAVA_V1}


@dataclass(frozen=True)
class Exchange:
    """One earlier exchange of a chat; pose tokens in `assistant` are written as POSE_MARKER."""

    user: str
    assistant: str


def get_template(name: str) -> ConversationTemplate:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ValueError(
            f"unknown conversation template {name!r}; known: {', '.join(sorted(TEMPLATES))}"
        ) from None


def image_prefix(count: int, image_token: str, use_im_start_end: bool) -> str:
    """The markers that open the first user message: one per image, then a newline."""
    if count == 0:
        return ""
    start, end = IMAGE_WRAPPERS
    marker = f"{start}{image_token}{end}" if use_im_start_end else image_token
    return marker * count + "\n"


def build_prompt(
    template: ConversationTemplate,
    user_message: str,
    history: Sequence[Exchange] = (),
    image_markers: str = "",
    pose_token: str = POSE_MARKER,
) -> str:
    """The whole conversation as text, ending with the assistant's role, ready to continue.

    `image_markers` (from `image_prefix`) goes at the start of the first user message, as in
    LLaVA, so a chat's images stay in its first turn. Earlier answers get their POSE_MARKERs
    replaced by the model's `pose_token`.
    """
    user, assistant = template.roles
    parts = [template.system, template.sep]
    for index, turn in enumerate(history):
        question = image_markers + turn.user if index == 0 else turn.user
        answer = turn.assistant.replace(POSE_MARKER, pose_token)
        parts += [f"{user}: {question}", template.sep, f"{assistant}: {answer}", template.sep2]
    question = user_message if history else image_markers + user_message
    parts += [f"{user}: {question}", template.sep, f"{assistant}:"]
    return "".join(parts)


def conversation_prefix(template: ConversationTemplate) -> str:
    """The text every prompt from `build_prompt` starts with: the system prompt and the first
    user role, before anything the user wrote."""
    return f"{template.system}{template.sep}{template.roles[0]}:"


def with_answer(prompt: str, answer: str) -> str:
    """A prompt from `build_prompt` followed by a (forced) assistant answer."""
    return f"{prompt} {answer}"


# The pose questions and answers of the paper (docs: chatpose-method.md). Several phrasings
# were mixed in training; the service always uses these, unless a checkpoint says otherwise.
# Questions take {description}, the text without its final punctuation; answers take {pose}.
TEXT_QUESTION = "{description}, can you give the SMPL pose of this person?"
TEXT_ANSWER = "Sure, it is {pose}."
IMAGE_QUESTION = "Can you provide the SMPL pose of the person in the center of this image?"
IMAGE_ANSWER = "Sure, the SMPL pose of this person is {pose}."
# Image and text together (our phrasing): the text says which person or what to look at.
IMAGE_TEXT_QUESTION = "{description}. Can you provide the SMPL pose of this person?"


@dataclass(frozen=True)
class PoseWording:
    """The questions a pose request is asked in, and the answers forced after them."""

    text_question: str
    text_answer: str
    image_question: str
    image_answer: str
    image_text_question: str


WORDINGS = {
    "paper": PoseWording(
        TEXT_QUESTION, TEXT_ANSWER, IMAGE_QUESTION, IMAGE_ANSWER, IMAGE_TEXT_QUESTION
    ),
    # The release's training code (its utils/utils.py) draws from lists that hold none of the
    # paper's questions: one of each of its lists, for a checkpoint converted from it.
    "release": PoseWording(
        text_question="There is a person: {description}. Please output this person's SMPL pose.",
        text_answer="Sure, it is {pose}.",
        image_question="Can you predict the SMPL pose of the person in this image?",
        image_answer="Sure, it is {pose}.",
        image_text_question="{description}. Please respond with SMPL pose.",
    ),
}


def pose_exchange(
    description: str | None,
    has_image: bool,
    pose_token: str = POSE_MARKER,
    wording: str = "paper",
) -> tuple[str, str]:
    """(question, answer) for a pose request in `wording` (a key of WORDINGS); the answer
    holds exactly one `pose_token`."""
    words = WORDINGS[wording]
    text = trimmed(description or "")  # pasted marks that show nothing are no description
    if not text and not has_image:
        raise ValueError("a pose request needs a description, an image, or both")
    if not has_image:
        question, answer = words.text_question, words.text_answer
    elif not text:
        question, answer = words.image_question, words.image_answer
    else:
        question, answer = words.image_text_question, words.image_answer
    return question.format(description=text.rstrip(".!?,;: ")), answer.format(pose=pose_token)
