import pytest

from inference_service.prompts import (
    LLAVA_V1,
    POSE_MARKER,
    Exchange,
    build_prompt,
    get_template,
    image_prefix,
    pose_exchange,
    with_answer,
)

SYSTEM = LLAVA_V1.system


def test_single_turn_llava_v1_layout():
    assert build_prompt(LLAVA_V1, "Hello") == f"{SYSTEM} USER: Hello ASSISTANT:"


def test_history_uses_both_separators_and_the_models_pose_token():
    history = [
        Exchange("Make him sit.", f"Sure, it is {POSE_MARKER}."),
        Exchange("Thanks", "You're welcome."),
    ]
    prompt = build_prompt(LLAVA_V1, "Now stand", history, pose_token="[SEG]")
    assert prompt == (
        f"{SYSTEM} USER: Make him sit. ASSISTANT: Sure, it is [SEG].</s>"
        "USER: Thanks ASSISTANT: You're welcome.</s>USER: Now stand ASSISTANT:"
    )


def test_image_markers_open_the_first_user_message_only():
    markers = image_prefix(1, "<image>", use_im_start_end=False)
    assert markers == "<image>\n"
    assert build_prompt(LLAVA_V1, "Pose?", image_markers=markers) == (
        f"{SYSTEM} USER: <image>\nPose? ASSISTANT:"
    )
    with_history = build_prompt(LLAVA_V1, "And now?", [Exchange("Pose?", "Sure.")], markers)
    assert with_history.count("<image>") == 1
    assert "USER: <image>\nPose? ASSISTANT: Sure.</s>USER: And now?" in with_history


def test_image_prefix_variants():
    assert image_prefix(0, "<image>", True) == ""
    assert image_prefix(1, "<image>", True) == "<im_start><image><im_end>\n"
    assert image_prefix(2, "<image>", False) == "<image><image>\n"


def test_text_to_pose_exchange_is_the_paper_s():
    question, answer = pose_exchange("a man raising both arms.", has_image=False)
    assert question == "a man raising both arms, can you give the SMPL pose of this person?"
    assert answer == "Sure, it is <POSE>."
    prompt = with_answer(build_prompt(LLAVA_V1, question), answer)
    assert prompt.endswith(
        "USER: a man raising both arms, can you give the SMPL pose of this person? "
        "ASSISTANT: Sure, it is <POSE>."
    )


def test_image_to_pose_exchange_is_the_paper_s():
    question, answer = pose_exchange(None, has_image=True, pose_token="[SEG]")
    assert question == "Can you provide the SMPL pose of the person in the center of this image?"
    assert answer == "Sure, the SMPL pose of this person is [SEG]."


def test_the_release_wording_is_its_training_code_s():
    # utils/utils.py of the release: TEXT_SHORT_QUESTION_LIST[1], SHORT_QUESTION_LIST[0],
    # LONG_QUESTION_LIST[0] and ANSWER_LIST[2].
    assert pose_exchange("The person kneels.", False, "[SEG]", "release") == (
        "There is a person: The person kneels. Please output this person's SMPL pose.",
        "Sure, it is [SEG].",
    )
    assert pose_exchange(None, True, "[SEG]", "release") == (
        "Can you predict the SMPL pose of the person in this image?",
        "Sure, it is [SEG].",
    )
    assert pose_exchange("the man in red", True, "[SEG]", "release") == (
        "the man in red. Please respond with SMPL pose.",
        "Sure, it is [SEG].",
    )


def test_image_and_text_exchange_keeps_the_description():
    question, answer = pose_exchange("  The woman on the left", has_image=True)
    assert question == "The woman on the left. Can you provide the SMPL pose of this person?"
    assert answer.count("<POSE>") == 1


def test_empty_pose_request_is_refused():
    with pytest.raises(ValueError, match="needs a description, an image"):
        pose_exchange("   ", has_image=False)


def test_marks_that_show_nothing_are_no_description_of_an_image():
    # Pasted with the prompt (a zero-width space, a byte order mark), as whitespace is.
    assert pose_exchange("\u200b \ufeff", has_image=True) == pose_exchange("", has_image=True)
    question, _ = pose_exchange("\u200bThe woman on the left\u2060", has_image=True)
    assert question.startswith("The woman on the left. ")


def test_unknown_template_is_named():
    assert get_template("llava_v1") is LLAVA_V1
    with pytest.raises(ValueError, match="'vicuna'"):
        get_template("vicuna")
