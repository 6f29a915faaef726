import contextlib
import dataclasses
import io
import json
import logging
import re
import shutil
import sys
import threading
import weakref

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from PIL import Image
from transformers import AddedToken, AutoTokenizer, LlavaForConditionalGeneration

from inference_service import images, loading, modeling_chatpose
from inference_service.errors import (
    BadImageError,
    CheckpointError,
    EmptyPromptError,
    MissingDependencyError,
    ModelError,
    ModelOutOfMemoryError,
    UnsupportedInputError,
)
from inference_service.images import decode_image
from inference_service.modeling_chatpose import ChatPoseModel, PosePrompt
from inference_service.prompts import Exchange, build_prompt, pose_exchange

from . import tiny_llava
from .forcing import ForceTokens, answer_ids

TEXT = "a man raising both arms"
RED = tiny_llava.image_bytes((220, 30, 30))
BLUE = tiny_llava.image_bytes((20, 40, 230), size=(30, 50), fmt="JPEG")


def test_loads_from_directory_on_cpu_in_float32(tiny_model):
    assert tiny_model.device.type == "cpu"
    assert tiny_model.dtype == torch.float32
    assert tiny_model.config.hidden_size == tiny_llava.HIDDEN
    assert not tiny_model.head.training and not tiny_model.model.training


def test_the_weights_size_comes_from_the_file_headers(tiny_checkpoint, tmp_path):
    model = LlavaForConditionalGeneration.from_pretrained(tiny_checkpoint / "base")
    stored = {id(p): p.numel() for p in model.state_dict().values()}  # tied weights once
    base = tiny_checkpoint / "base"
    assert loading.weights_bytes(base, torch.float32) == 4 * sum(stored.values())
    assert loading.weights_bytes(base, torch.bfloat16) == 2 * sum(stored.values())
    (tmp_path / "pytorch_model.bin").write_bytes(b"weights in another format")
    assert loading.weights_bytes(tmp_path, torch.float32) is None
    # Quantized, bitsandbytes turns the language model's linear layers alone to 4 bits: the
    # vision side, the output layer and the embeddings stay. Counted for all, a card ~1 GB
    # short passed the check, and the load failed as a "broken" checkpoint.
    skipped = ("vision_tower", "multi_modal_projector", "lm_head")
    linear = sum(
        module.weight.numel()
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and not any(s in name for s in skipped)
    )
    rest = sum(stored.values()) - linear
    assert loading.weights_bytes(base, torch.bfloat16, bits=4) == 2 * rest + linear // 2
    assert 0 < linear < sum(stored.values())


def test_a_model_larger_than_the_free_memory_is_refused_before_it_loads(
    tiny_checkpoint, monkeypatch
):
    needed = loading.weights_bytes(tiny_checkpoint / "base", torch.float32)
    loads = []

    class Loading(Exception):
        pass

    def load_base(*args, **kwargs):
        loads.append(args)
        raise Loading

    monkeypatch.setattr(loading, "load_base", load_base)
    monkeypatch.setattr(loading, "free_host_memory", lambda: needed - 1)
    with pytest.raises(ModelError, match=r"needs about 0\.0 GB of memory in float32 on the CPU"):
        ChatPoseModel.from_checkpoint(tiny_checkpoint, device="cpu")
    assert not loads
    monkeypatch.setattr(loading, "free_host_memory", lambda: needed)
    with pytest.raises(Loading):  # it goes on to load
        ChatPoseModel.from_checkpoint(tiny_checkpoint, device="cpu")
    assert loads


def test_free_memory_counts_what_linux_can_still_give(monkeypatch, tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(
        "MemTotal: 1000 kB\nMemFree: 100 kB\nMemAvailable: 600 kB\nSwapFree: 50 kB\n"
    )
    real_path = loading.Path
    monkeypatch.setattr(
        loading, "Path", lambda p: meminfo if p == "/proc/meminfo" else real_path(p)
    )
    monkeypatch.setattr(loading, "cgroup_memory_left", lambda: None)  # no limit
    assert loading.free_host_memory() == 650 * 1024
    monkeypatch.setattr(loading, "cgroup_memory_left", lambda: 300 * 1024)
    assert loading.free_host_memory() == 300 * 1024  # a container's limit
    meminfo.write_text("MemTotal: 1000 kB\n")  # a kernel before 3.14
    assert loading.free_host_memory() is None


@pytest.mark.parametrize(
    ("membership", "files", "left"),
    [
        ("0::/\n", {"memory.max": "1000000\n", "memory.current": "250000\n"}, 750000),
        ("0::/\n", {"memory.max": "max\n", "memory.current": "250000\n"}, None),
        (  # the file cache an earlier load left is charged, and the kernel gives it back
            "0::/\n",
            {
                "memory.max": "1000",
                "memory.current": "900",
                "memory.stat": "anon 100\ninactive_file 700\n",
            },
            800,  # 1000 - (900 - 700)
        ),
        (  # the limit set on a group above this one (Slurm's job, its step below it)
            "0::/job_7/step_0\n",
            {
                "job_7/memory.max": "5000",
                "job_7/memory.current": "1000",
                "job_7/step_0/memory.max": "max",
                "job_7/step_0/memory.current": "800",
            },
            4000,
        ),
        (  # v1, the group named by its path (a docker container seen from the host)
            "5:cpu:/\n4:memory:/docker/abc\n",
            {
                "memory/docker/abc/memory.limit_in_bytes": "2000",
                "memory/docker/abc/memory.usage_in_bytes": "500",
                "memory/memory.limit_in_bytes": "9",
            },
            1500,
        ),  # fmt: skip
        (  # v1, a limit on the group above, nearly all of it used by the groups beside this
            "4:memory:/user.slice/session.scope\n",
            {
                "memory/user.slice/memory.limit_in_bytes": "4000",
                "memory/user.slice/memory.usage_in_bytes": "3900",
                "memory/user.slice/memory.stat": "total_inactive_file 50\n\x00\n",
                "memory/user.slice/session.scope/memory.limit_in_bytes": "9223372036854771712",
                "memory/user.slice/session.scope/memory.usage_in_bytes": "100",
            },
            150,  # 4000 - (3900 - 50)
        ),
        # A group name that is not UTF-8, its folder gone: the limit above it still counts.
        ("0::/caf\udce9\n", {"memory.max": "1000", "memory.current": "100"}, 900),
        ("0::/../sibling\n", {"memory.max": "1000", "memory.current": "100"}, None),  # outside
        (  # v1 in its own view (the group is "/"), unlimited: a page-rounded 2**63
            "4:memory:/\n",
            {
                "memory/memory.limit_in_bytes": "9223372036854771712",
                "memory/memory.usage_in_bytes": "5",
            },
            None,
        ),  # fmt: skip
        ("4:memory:/\n", {}, None),  # no files to read
    ],
)
def test_a_cgroup_memory_limit_is_what_a_container_still_allows(tmp_path, membership, files, left):
    (tmp_path / "cgroup").write_bytes(membership.encode("utf-8", "surrogateescape"))
    for name, text in files.items():
        (tmp_path / "fs" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "fs" / name).write_text(text)
    found = loading.cgroup_memory_left(str(tmp_path / "fs"), str(tmp_path / "cgroup"))
    assert found == left


def test_pose_token_is_added_when_missing_and_found_by_id(tiny_checkpoint, tiny_model):
    base_tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint / "base", local_files_only=True)
    assert "<POSE>" not in base_tokenizer.get_vocab()
    assert tiny_model.pose_token_id == len(base_tokenizer)
    assert tiny_model.pose_token_id == tiny_model.tokenizer.convert_tokens_to_ids("<POSE>")
    assert tiny_model.model.get_input_embeddings().weight.shape[0] == len(tiny_model.tokenizer)
    ids = tiny_model.tokenizer("it is <POSE>.", add_special_tokens=False).input_ids
    assert ids.count(tiny_model.pose_token_id) == 1


def _checkpoint_with_tokens(root, tokens, **config_fields):
    tokenizer = tiny_llava.build_tokenizer()
    tokenizer.add_tokens(tokens, special_tokens=True)
    processor = tiny_llava.build_processor(tokenizer)
    model = tiny_llava.build_llava(tokenizer)
    return tiny_llava.write_checkpoint(
        root, model, processor, tiny_llava.build_head(), **config_fields
    )


def test_a_pose_token_no_training_has_seen_is_refused_or_warned_of(
    tiny_checkpoint, tmp_path, caplog
):
    # A release's [SEG] model with chatpose.json's pose_token left at its default (or mistyped)
    # loaded with a new, untrained <POSE> row: plausible poses, wrong, and nothing said.
    release = _checkpoint_with_tokens(tmp_path / "release", ["[SEG]"])
    named = r"pose_token is '<POSE>', which the tokenizer lacks, but it has '\[SEG\]'"
    with pytest.raises(CheckpointError, match=named):
        ChatPoseModel.from_checkpoint(release, device="cpu")
    with caplog.at_level(logging.WARNING, logger="inference_service.loading"):
        ChatPoseModel.from_checkpoint(tiny_checkpoint, device="cpu")  # no pose token at all
    assert "the tokenizer has no pose token '<POSE>'" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="inference_service.loading"):
        ChatPoseModel.from_checkpoint(
            _checkpoint_with_tokens(tmp_path / "own", ["<POSE>"]), device="cpu"
        )
    assert not caplog.text


def test_a_space_token_before_the_release_s_pose_token_is_warned_of(tmp_path, caplog):
    # A release converted other than by convert_official: "is", "▁", "[SEG]", and the head
    # reads the space's state, not the word's the release trained on.
    spaced = _checkpoint_with_tokens(tmp_path / "spaced", ["[SEG]"], pose_token="[SEG]")
    with caplog.at_level(logging.WARNING, logger="inference_service.loading"):
        ChatPoseModel.from_checkpoint(spaced, device="cpu")
    assert "reads a whitespace token 'Ġ' before [SEG]" in caplog.text
    caplog.clear()
    stripped = AddedToken("[SEG]", lstrip=True, rstrip=True, normalized=False, special=True)
    converted = _checkpoint_with_tokens(tmp_path / "converted", [stripped], pose_token="[SEG]")
    with caplog.at_level(logging.WARNING, logger="inference_service.loading"):
        ChatPoseModel.from_checkpoint(converted, device="cpu")
    assert not caplog.text


def test_a_vision_tower_of_another_picture_size_than_its_processor_is_refused(tmp_path):
    # It loaded, answered text, and failed every image request inside the tower.
    tokenizer = tiny_llava.build_tokenizer()
    tower = tiny_llava.vision_config(image_size=2 * tiny_llava.IMAGE_SIZE)
    model = tiny_llava.build_llava(tokenizer, vision=tower)
    root = tiny_llava.write_checkpoint(
        tmp_path / "c", model, tiny_llava.build_processor(tokenizer), tiny_llava.build_head()
    )
    side = 2 * tiny_llava.IMAGE_SIZE
    with pytest.raises(CheckpointError, match=rf"vision tower takes {side}x{side} pictures"):
        ChatPoseModel.from_checkpoint(root, device="cpu")


@pytest.mark.parametrize(
    "missing, named",
    [
        (
            "tokenizer_config.json",
            "tokenizer_config.json: file not found (the tokenizer's settings",
        ),
        ("processor_config.json", "processor_config.json: file not found (the image processor's"),
    ],
)
def test_a_base_without_its_tokenizer_or_processor_settings_names_the_file(
    tiny_checkpoint, tmp_path, missing, named
):
    root = shutil.copytree(tiny_checkpoint, tmp_path / "c")
    (root / "base" / missing).unlink()
    with pytest.raises(CheckpointError, match=re.escape(named)):
        ChatPoseModel.from_checkpoint(root, device="cpu")


def test_a_git_lfs_pointer_or_a_tokenizer_longer_than_the_embeddings_is_named_at_load(
    tiny_checkpoint, tmp_path
):
    pointer = tmp_path / "pointer"
    shutil.copytree(tiny_checkpoint, pointer)
    (pointer / "base" / "tokenizer.json").write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:4d7a\nsize 1842767\n"
    )
    with pytest.raises(CheckpointError, match=r"tokenizer.json: a Git LFS pointer, not the file"):
        ChatPoseModel.from_checkpoint(pointer, device="cpu")
    unread = tmp_path / "unread"  # another framework's weights, never pulled, never read
    shutil.copytree(tiny_checkpoint, unread)
    shutil.copy(pointer / "base" / "tokenizer.json", unread / "base" / "tf_model.h5")
    ChatPoseModel.from_checkpoint(unread, device="cpu")

    longer = tmp_path / "longer"
    shutil.copytree(tiny_checkpoint, longer)
    tokenizer = AutoTokenizer.from_pretrained(longer / "base", local_files_only=True)
    rows = len(tokenizer)
    tokenizer.add_tokens(["<extra_1>", "<extra_2>"], special_tokens=True)
    tokenizer.save_pretrained(longer / "base")
    expected = rf"has {rows + 2} tokens and the model's embeddings {rows} rows, none for '<ex"
    with pytest.raises(CheckpointError, match=expected + r"tra_1>' and 1 more"):
        ChatPoseModel.from_checkpoint(longer, device="cpu")

    # The pose token alone past the rows is what loading adds a row for: no error.
    posed = tmp_path / "posed"
    shutil.copytree(tiny_checkpoint, posed)
    tokenizer = AutoTokenizer.from_pretrained(posed / "base", local_files_only=True)
    tokenizer.add_tokens(["<POSE>"], special_tokens=True)
    tokenizer.save_pretrained(posed / "base")
    assert ChatPoseModel.from_checkpoint(posed, device="cpu").pose_token_id == rows


@pytest.mark.parametrize(
    "request_",
    [PosePrompt(TEXT), PosePrompt(images=(RED,)), PosePrompt("the man on the left", (BLUE,))],
    ids=["text", "image", "both"],
)
def test_fast_path_gives_finite_24x3_poses(tiny_model, request_):
    (pose,) = tiny_model.predict_poses([request_])
    assert pose.shape == (24, 3)
    assert np.isfinite(pose).all()
    assert (np.linalg.norm(pose, axis=-1) <= np.pi + 1e-9).all()


def test_text_image_and_both_give_different_poses(tiny_model):
    poses = tiny_model.predict_poses(
        [
            PosePrompt(TEXT),
            PosePrompt(images=(RED,)),
            PosePrompt(TEXT, (RED,)),
            PosePrompt(images=(BLUE,)),
        ]
    )
    for i in range(len(poses)):
        for j in range(i + 1, len(poses)):
            assert np.abs(poses[i] - poses[j]).max() > 1e-3


def test_batched_fast_path_equals_one_request_at_a_time(tiny_model):
    requests = [
        PosePrompt(TEXT),
        PosePrompt(images=(RED,)),
        PosePrompt("a much longer description: kneeling on the left knee, arms stretched", (BLUE,)),
        PosePrompt("sitting"),
    ]
    batched = tiny_model.predict_poses(requests)
    for request, pose in zip(requests, batched, strict=True):
        (single,) = tiny_model.predict_poses([request])
        np.testing.assert_allclose(pose, single, atol=1e-5)


def test_the_cached_prompt_beginning_gives_the_states_of_a_whole_pass(tiny_model, monkeypatch):
    requests = [PosePrompt(TEXT), PosePrompt("sitting", (RED,)), PosePrompt(images=(BLUE,))]
    seen_lengths: list[int] = []
    kept: list[int] = []  # key/value positions a cache holds after the pass
    backbone = tiny_model._backbone

    def recording(**inputs):
        seen_lengths.append(inputs["input_ids"].shape[1])
        output = backbone(**inputs)
        cache = inputs.get("past_key_values") or output.past_key_values
        kept.append(0 if cache is None else cache.get_seq_length())
        return output

    monkeypatch.setattr(tiny_model, "_backbone", recording)
    cached = tiny_model.pose_states(requests)
    cached_length = tiny_model.cached_prefix_length
    monkeypatch.setattr(modeling_chatpose.PrefixStates, "matches", lambda self, ids: False)
    whole = tiny_model.pose_states(requests)
    # the first pass read only what follows the prefix; the second read every token
    assert cached_length > 10
    assert seen_lengths[-1] - seen_lengths[-2] == cached_length
    # Neither pass keeps its tokens' keys and values (a 13B batch's would take gigabytes).
    assert kept[-2:] == [cached_length, 0]
    torch.testing.assert_close(cached, whole, atol=1e-5, rtol=1e-5)


def test_prefix_states_match_only_rows_that_start_with_them_and_go_on():
    prefix = modeling_chatpose.PrefixStates(torch.tensor([[1, 5, 6]]), layers=[])
    assert prefix.matches(torch.tensor([[1, 5, 6, 9], [1, 5, 6, 0]]))
    assert not prefix.matches(torch.tensor([[1, 5, 6, 9], [1, 5, 7, 9]]))
    assert not prefix.matches(torch.tensor([[1, 5, 6]]))


def test_empty_batch_gives_no_poses(tiny_model):
    assert tiny_model.predict_poses([]) == []


@pytest.mark.parametrize("images", [(), (RED,)], ids=["text", "image"])
def test_chat_path_with_kv_cache_equals_fast_path(tiny_model, images):
    question, answer = pose_exchange(TEXT, bool(images), tiny_model.config.pose_token)
    forced = answer_ids(tiny_model, question, answer, len(images))
    reply = tiny_model.chat(
        question, images, logits_processor=[ForceTokens(forced)], max_new_tokens=len(forced) + 5
    )
    (fast,) = tiny_model.predict_poses([PosePrompt(TEXT, images)])
    assert reply.text == answer and not reply.truncated  # ended by its end of sequence
    assert len(reply.poses) == 1
    np.testing.assert_allclose(reply.poses[0], fast, atol=1e-4)


@pytest.mark.parametrize(
    "generation",
    [{"prefill_chunk_size": 5}, {"prompt_lookup_num_tokens": 3}],
    ids=["chunked prefill", "prompt lookup"],
)
def test_chat_poses_do_not_depend_on_how_the_base_generates(tiny_model, monkeypatch, generation):
    """A base's generation config may prefill in chunks or verify several tokens a forward: the
    pose is still the state before the pose token, and generate keeps no layer's states."""
    question, answer = pose_exchange(TEXT, False, tiny_model.config.pose_token)
    forced = answer_ids(tiny_model, question, answer, 0)
    for name, value in generation.items():
        monkeypatch.setattr(tiny_model.model.generation_config, name, value)
    outputs = []
    generate = tiny_model.model.generate
    monkeypatch.setattr(
        tiny_model.model, "generate", lambda **kw: outputs.append(generate(**kw)) or outputs[-1]
    )
    reply = tiny_model.chat(question, logits_processor=[ForceTokens(forced)])
    (fast,) = tiny_model.predict_poses([PosePrompt(TEXT)])
    assert reply.text == answer and len(reply.poses) == 1
    np.testing.assert_allclose(reply.poses[0], fast, atol=1e-4)
    assert outputs[0].hidden_states is None


def test_reply_pose_states_are_generation_s_own_with_an_image_token_in_the_reply(
    tiny_model, monkeypatch
):
    """The reply's tokens are read as generation read them: text, on the prompt's cache, even
    the image token (the prompt's image features go with the prompt alone)."""
    image_id = tiny_model.tokenizer.convert_tokens_to_ids(tiny_model.image_token)
    words = tiny_model.tokenizer("It is", add_special_tokens=False).input_ids
    pose_id = tiny_model.pose_token_id
    forced = [*words, image_id, pose_id, tiny_model.tokenizer.eos_token_id]
    generations, states = [], []
    generate, reply_states = tiny_model.model.generate, tiny_model._reply_pose_states

    def generate_keeping_states(**kwargs):
        generations.append(generate(**{**kwargs, "output_hidden_states": True}))
        return generations[-1]

    def recorded(inputs, generated):
        states.append(reply_states(inputs, generated))
        return states[-1]

    monkeypatch.setattr(tiny_model.model, "generate", generate_keeping_states)
    monkeypatch.setattr(tiny_model, "_reply_pose_states", recorded)
    reply = tiny_model.chat(
        "Show me the pose", [RED], logits_processor=[ForceTokens(forced)], max_new_tokens=8
    )
    assert len(reply.poses) == 1
    at_pose = generations[0].hidden_states[forced.index(pose_id)][-1][0, -1]
    torch.testing.assert_close(states[0][0], at_pose, atol=1e-5, rtol=1e-5)


def test_reply_with_several_pose_tokens_gives_several_poses(tiny_model):
    answer = "Two poses: first sitting <POSE>, then standing <POSE>."
    forced = answer_ids(tiny_model, "Show me two poses.", answer, 0)
    reply = tiny_model.chat("Show me two poses.", logits_processor=[ForceTokens(forced)])
    assert reply.text == answer
    assert len(reply.poses) == 2
    assert all(pose.shape == (24, 3) and np.isfinite(pose).all() for pose in reply.poses)
    assert np.abs(reply.poses[0] - reply.poses[1]).max() > 1e-3


def test_chat_takes_history_and_bounds_new_tokens(tiny_model):
    history = [Exchange("Make him sit.", "Sure, it is <POSE>.")]
    # A long forced answer without EOS: generation must stop after max_new_tokens.
    forced = answer_ids(tiny_model, "Now stand up.", "Sure, it is <POSE>. " * 3)[:-1]
    reply = tiny_model.chat(
        "Now stand up.", history=history, max_new_tokens=4, logits_processor=[ForceTokens(forced)]
    )
    assert reply.text == tiny_model.tokenizer.decode(forced[:4]).strip()
    assert len(forced) > 4 and reply.truncated  # said: the model did not end it
    with pytest.raises(UnsupportedInputError, match="max_new_tokens must be between 1 and 512"):
        tiny_model.chat("Hi", max_new_tokens=513)


def _raise(error):
    def raising(*args, **kwargs):
        raise error

    return raising


def test_a_chat_reply_ends_as_soon_as_it_is_told_to_stop(tiny_model, monkeypatch):
    forced = answer_ids(tiny_model, "Talk.", "<POSE> it is <POSE>. " * 3)[:-1]
    asked = []

    def stop() -> bool:  # cancelled once three tokens are out
        asked.append(None)
        return len(asked) >= 3

    # Nor is the prompt run again for the poses of a reply nobody wants: the model is free.
    monkeypatch.setattr(tiny_model, "_reply_pose_states", _raise(AssertionError("ran again")))
    reply = tiny_model.chat(
        "Talk.", max_new_tokens=50, logits_processor=[ForceTokens(forced)], stop=stop
    )
    assert reply.text == tiny_model.tokenizer.decode(forced[:3]).strip() and reply.poses == []
    assert len(asked) == 4  # before each of the three tokens, and once it stopped


def test_chat_leaves_out_the_oldest_turns_that_do_not_fit_the_context(tiny_model, caplog):
    caplog.set_level("INFO", logger="inference_service.modeling_chatpose")
    history = [
        Exchange(f"Pose number {i}: " + "raise the arm " * 20, "Sure, it is <POSE>.")
        for i in range(12)
    ]
    max_new_tokens = 64
    budget = tiny_model.context_length - max_new_tokens
    kept = tiny_model.fitting_history("Now sit.", history, [], max_new_tokens)
    assert 0 < len(kept) < len(history)
    assert list(kept) == history[len(history) - len(kept) :]  # the latest turns, in order
    said = f"the {len(kept)} latest of 12 earlier exchanges fit this model's context of"
    assert said in caplog.text  # in the service's log, and in the reply (below)

    def length(turns):
        text = build_prompt(tiny_model.template, "Now sit.", turns, "", "<POSE>")
        return len(tiny_model.tokenizer(text)["input_ids"])

    assert length(kept) <= budget < length(history[len(history) - len(kept) - 1 :])
    short = history[-2:]
    assert tiny_model.fitting_history("Now sit.", short, [], max_new_tokens) == short
    # Given the whole conversation, chat reads only what fits and still answers.
    force = ForceTokens(answer_ids(tiny_model, "Now sit.", "Sure, it is <POSE>."))
    reply = tiny_model.chat(
        "Now sit.", history=history, max_new_tokens=max_new_tokens, logits_processor=[force]
    )
    assert force.start == length(kept)  # the prompt generate was given
    assert reply.text == "Sure, it is <POSE>." and len(reply.poses) == 1
    assert reply.exchanges_left_out == len(history) - len(kept)  # exchanges: the client is told


def test_a_chat_message_longer_than_the_context_is_a_typed_error(tiny_model):
    with pytest.raises(UnsupportedInputError, match=r"prompt: the message is \d+ tokens") as error:
        tiny_model.chat("raise the arm " * 400, max_new_tokens=16)
    assert error.value.code == "unsupported_input"


def test_a_pose_prompt_longer_than_the_context_is_a_typed_error(tiny_model):
    with pytest.raises(UnsupportedInputError, match=r"prompt: \d+ tokens .* reads 512"):
        tiny_model.predict_poses([PosePrompt("raise the arm " * 400)])


def test_a_head_of_another_width_than_the_language_model_is_refused_at_load(tiny_model):
    config = dataclasses.replace(tiny_model.config, hidden_size=tiny_model.config.hidden_size * 2)
    with pytest.raises(CheckpointError, match="hidden_size is .* the language model's states"):
        ChatPoseModel(tiny_model.model, tiny_model.processor, tiny_model.head, config)


def test_bad_image_bytes_raise_a_typed_error(tiny_model):
    with pytest.raises(BadImageError):
        tiny_model.predict_poses([PosePrompt(TEXT), PosePrompt(images=(b"\x89PNG broken",))])
    with pytest.raises(BadImageError, match=r"^images\[0\]: not a decodable PNG or JPEG"):
        tiny_model.chat("What is this?", [b"not an image"])  # named as the request names it


def edged(grey: int, step: int) -> Image.Image:
    """Grey with a corner `step` lighter."""
    picture = Image.new("L", (40, 30), grey)
    picture.paste(grey + step, (0, 0, 4, 4))
    return picture


def png_of(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    "picture",
    [
        Image.new("RGBA", (40, 30), (255, 0, 0, 0)),  # a cut-out exported with no alpha at all
        Image.new("RGB", (1, 1), (90, 40, 200)),
        Image.new("RGB", (40, 30), (255, 255, 255)),
        edged(200, images.FLAT_TOLERANCE),  # a JPEG's noise on a blank wall
    ],
    ids=["transparent", "one pixel", "white", "near flat"],
)
def test_a_picture_of_one_flat_colour_is_refused_not_answered(tiny_model, picture):
    # A pose guessed from it would be noise, applied as if it were an answer.
    parts = (tiny_model.model, tiny_model.processor, tiny_model.head, tiny_model.config)
    serving = ChatPoseModel(*parts, refuse_guesses=True)  # as the service loads it
    data = png_of(picture)
    with pytest.raises(BadImageError, match=r"^images\[0\]: shows one flat colour and no body"):
        serving.predict_poses([PosePrompt(images=(data,))])
    with pytest.raises(BadImageError, match=r"^images\[0\]: shows one flat colour"):
        serving.chat("Who is this?", [data])
    # A picture with anything in it still gets its pose: one grey step past the tolerance.
    shown = png_of(edged(200, images.FLAT_TOLERANCE + 1))
    assert serving.predict_poses([PosePrompt(images=(shown,))])[0].shape == (24, 3)
    # Training and evaluation read their data as it is.
    assert tiny_model.predict_poses([PosePrompt(images=(data,))])[0].shape == (24, 3)


def test_a_large_picture_is_reduced_before_the_processor_holds_it(tiny_model, monkeypatch):
    photo = tiny_llava.image_bytes((200, 120, 40), size=(1600, 1200), fmt="JPEG")
    seen = []
    encode = tiny_model._encode

    def recording(texts, images):
        seen.extend(image.size for image in images)
        return encode(texts, images)

    monkeypatch.setattr(tiny_model, "_encode", recording)
    reduced = tiny_model.predict_poses([PosePrompt(TEXT, images=(photo,))])[0]
    side = tiny_model.config.image_size
    assert len(seen) == 1 and 2 * side <= min(seen[0]) < 4 * side

    unreduced = lambda data, field, **_: decode_image(data, field)  # noqa: E731
    monkeypatch.setattr(modeling_chatpose, "decode_image", unreduced)
    full = tiny_model.predict_poses([PosePrompt(TEXT, images=(photo,))])[0]
    assert seen[1] == (1600, 1200)
    np.testing.assert_allclose(reduced, full, atol=2e-3)  # the model sees the same picture


def test_too_many_images_raise_a_typed_error(tiny_model):
    with pytest.raises(UnsupportedInputError, match="2 images given; .* at most 1") as error:
        tiny_model.predict_poses([PosePrompt(images=(RED, BLUE))])
    assert error.value.code == "unsupported_input"
    with pytest.raises(UnsupportedInputError, match="at most 1"):
        tiny_model.chat("Compare them", [RED, BLUE])


def test_several_images_when_the_checkpoint_allows_them(tiny_model):
    config = dataclasses.replace(tiny_model.config, max_images=2)
    model = ChatPoseModel(tiny_model.model, tiny_model.processor, tiny_model.head, config)
    two, one = model.predict_poses([PosePrompt(images=(RED, BLUE)), PosePrompt(images=(RED,))])
    assert np.isfinite(two).all()
    assert np.abs(two - one).max() > 1e-3


@pytest.mark.parametrize(
    "call",
    [
        lambda m: m.predict_poses([PosePrompt()]),
        lambda m: m.predict_poses([PosePrompt("  ")]),
        lambda m: m.chat(" "),
    ],
    ids=["nothing", "blank", "blank-chat"],
)
def test_nothing_to_answer_raises_empty_prompt(tiny_model, call):
    with pytest.raises(EmptyPromptError) as error:
        call(tiny_model)
    assert error.value.code == "empty_prompt"


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda m: m.predict_poses([PosePrompt("look at <image> here")]), "prompt"),
        (
            lambda m: m.chat("hi", history=[Exchange("ok", "ok"), Exchange("<image>", "ok")]),
            "history[2].text",
        ),
        (lambda m: m.chat("hi", history=[Exchange("ok", "see <image>")]), "history[1].text"),
    ],
    ids=["image-marker", "image-marker-history", "image-marker-reply"],
)
def test_unusable_input_raises_unsupported_input(tiny_model, call, field):
    with pytest.raises(UnsupportedInputError, match=re.escape(f"{field}: must not")):
        call(tiny_model)


@pytest.fixture(scope="module")
def lora_checkpoints(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint with a LoRA adapter in adapter/, and the same adapter merged."""
    root = tmp_path_factory.mktemp("lora")
    base = LlavaForConditionalGeneration.from_pretrained(tiny_checkpoint / "base")
    torch.manual_seed(3)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        init_lora_weights=False,  # random B, so the adapter changes outputs
        target_modules=r".*language_model.*\.(q_proj|v_proj)",
    )
    with loading.quiet_peft():
        peft_model = get_peft_model(base, config)
    adapter = root / "adapter_ckpt"
    peft_model.save_pretrained(adapter / "adapter")
    (adapter / "pose_head.safetensors").write_bytes(
        (tiny_checkpoint / "pose_head.safetensors").read_bytes()
    )
    chatpose_json = (tiny_checkpoint / "chatpose.json").read_text()
    # This one also exercises a base model given as an absolute path.
    (adapter / "chatpose.json").write_text(
        chatpose_json.replace('"base"', f'"{tiny_checkpoint / "base"}"')
    )
    merged = root / "merged_ckpt"
    processor = loading.AutoProcessor.from_pretrained(tiny_checkpoint / "base")
    tiny_llava.write_checkpoint(
        merged, peft_model.merge_and_unload(), processor, tiny_llava.build_head()
    )
    return adapter, merged


def test_lora_adapter_changes_output_and_equals_merged(tiny_model, lora_checkpoints):
    adapter, merged = lora_checkpoints
    requests = [PosePrompt(TEXT), PosePrompt(images=(RED,))]
    plain = tiny_model.predict_poses(requests)
    with_adapter = ChatPoseModel.from_checkpoint(adapter, device="cpu").predict_poses(requests)
    premerged = ChatPoseModel.from_checkpoint(merged, device="cpu").predict_poses(requests)
    for p, a, m in zip(plain, with_adapter, premerged, strict=True):
        assert np.abs(p - a).max() > 1e-3
        np.testing.assert_allclose(a, m, atol=1e-4)


def copy_without(source, destination, file, dropped: str):
    """A copy of the checkpoint `source` whose safetensors `file` lacks the tensors whose names
    contain `dropped`."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, destination)
    tensors = load_file(destination / file)
    kept = {name: tensor for name, tensor in tensors.items() if dropped not in name}
    assert len(kept) < len(tensors)
    save_file(kept, destination / file, metadata={"format": "pt"})
    return destination


def test_a_base_model_that_lacks_a_weight_is_refused_not_started_at_random(
    tiny_checkpoint, tmp_path
):
    damaged = copy_without(
        tiny_checkpoint, tmp_path / "damaged", "base/model.safetensors", "layers.1.mlp.down_proj"
    )
    with pytest.raises(CheckpointError, match=r"base: the weights have no .*layers\.1\.mlp"):
        ChatPoseModel.from_checkpoint(damaged, device="cpu")


def edited_copy(checkpoint, destination, file: str, change):
    """A copy of `checkpoint` whose JSON `file` (relative to it) is `change(its content)`."""
    shutil.copytree(checkpoint, destination)
    path = destination / file
    path.write_text(json.dumps(change(json.loads(path.read_text()))))
    return destination


def _one_layer(config):  # over two layers' weights: it would serve a cut-down model
    config["text_config"]["num_hidden_layers"] = 1
    return config


def _another_image_id(config):  # every request with an image would fail
    key = "image_token_index" if "image_token_index" in config else "image_token_id"  # by age
    config[key] += 1
    return config


@pytest.mark.parametrize(
    ("file", "change", "message"),
    [
        ("config.json", _one_layer, r"base: the weights hold .*layers\.1\..* no place"),
        ("config.json", _another_image_id, r"base/config.json: image_token_id is \d+, but"),
        (
            "config.json",
            lambda c: c["text_config"].update(num_hidden_layers=2.0) or c,  # a float
            "base: cannot load the base model",
        ),
        (
            "processor_config.json",
            lambda c: [],
            r"base/processor_config\.json: expected a JSON object",
        ),
    ],
)
def test_a_base_config_that_does_not_fit_its_files_is_refused_at_load(
    tiny_checkpoint, tmp_path, file, change, message
):
    damaged = edited_copy(tiny_checkpoint, tmp_path / "damaged", f"base/{file}", change)
    with pytest.raises(CheckpointError, match=message):
        ChatPoseModel.from_checkpoint(damaged, device="cpu")


@pytest.mark.parametrize(
    ("token", "message"),
    [
        ("<unk>", "is the tokenizer's padding token"),  # the converter makes <unk> the padding
        ("<image>", "is the tokenizer's image token"),
        ("is", "is not one token of the answer"),
    ],
)
def test_a_pose_token_that_cannot_mark_the_pose_is_refused_at_load(
    tiny_checkpoint, tmp_path, token, message
):
    changed = edited_copy(
        tiny_checkpoint, tmp_path / "changed", "chatpose.json", lambda c: c | {"pose_token": token}
    )
    with pytest.raises(CheckpointError, match=f"chatpose.json: pose_token '{token}' {message}"):
        ChatPoseModel.from_checkpoint(changed, device="cpu")


@pytest.mark.parametrize(
    ("flag", "how", "advice"),
    [
        (None, "bfloat16", "--load-in-8bit or --load-in-4bit need less"),
        ("load_in_8bit", "8-bit", "--load-in-4bit needs less"),
        ("load_in_4bit", "4-bit", "use a card with more memory free"),  # no less to ask for
    ],
)
def test_weights_that_cannot_fit_the_card_are_refused_before_the_load(
    tiny_checkpoint, monkeypatch, flag, how, advice
):
    # A quantized load that runs out is reported by transformers as a failed conversion.
    cuda = (torch.device("cuda:1"), torch.bfloat16)
    monkeypatch.setattr(loading, "select_device", lambda device: cuda)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(loading, "quantization_config", lambda *args: None)
    bits = {None: None, "load_in_8bit": 8, "load_in_4bit": 4}[flag]
    needed = loading.weights_bytes(tiny_checkpoint / "base", torch.bfloat16, bits)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (needed - 1, 10 * needed))
    options = {flag: True} if flag else {}
    said = f"the weights need about .* GB in {how}, and cuda:1 has .* GB free; {advice}"
    with pytest.raises(ModelOutOfMemoryError, match=said):
        ChatPoseModel.from_checkpoint(tiny_checkpoint, device="cuda:1", **options)


def test_a_chosen_cuda_card_is_made_current_before_the_model_loads(tiny_checkpoint, monkeypatch):
    calls = []
    cuda = (torch.device("cuda:1"), torch.bfloat16)
    monkeypatch.setattr(loading, "select_device", lambda device: cuda)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (2**40, 2**40))
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("current", device)))

    def load_base(base_dir, **options):
        calls.append(("load", options["device_map"]))
        raise CheckpointError("stop here: no GPU on this machine")

    monkeypatch.setattr(loading, "load_base", load_base)
    with pytest.raises(CheckpointError, match="stop here"):
        ChatPoseModel.from_checkpoint(tiny_checkpoint, device="cuda:1")
    assert calls == [("current", torch.device("cuda:1")), ("load", "cuda:1")]


def test_requests_run_with_the_model_s_card_current_in_the_scheduler_s_thread(monkeypatch):
    # The current CUDA device is per thread: the loading thread's choice does not reach the
    # scheduler's, where requests run (bitsandbytes' kernels use the current device).
    current = []

    @contextlib.contextmanager
    def cuda_device(device):
        current.append(device)
        yield
        current.pop()

    monkeypatch.setattr(torch.cuda, "device", cuda_device)

    class OnSecondCard:
        device = torch.device("cuda:1")

        @modeling_chatpose._request_entry
        def answer(self):
            return list(current)

    seen = []
    worker = threading.Thread(target=lambda: seen.append(OnSecondCard().answer()))
    worker.start()
    worker.join()
    assert seen == [[torch.device("cuda:1")]] and current == []


def test_out_of_gpu_memory_while_loading_says_so_not_that_the_checkpoint_is_bad(
    tiny_checkpoint, monkeypatch
):
    def exhausted(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 500.00 MiB")

    monkeypatch.setattr(loading.AutoModelForImageTextToText, "from_pretrained", exhausted)
    with pytest.raises(
        ModelError, match="out of GPU memory loading the model; --load-in-8bit"
    ) as e:
        ChatPoseModel.from_checkpoint(tiny_checkpoint, device="cpu")
    assert not isinstance(e.value, CheckpointError)


def test_out_of_gpu_memory_merging_the_adapter_says_so(lora_checkpoints, monkeypatch):
    adapter, _ = lora_checkpoints

    def exhausted(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 MiB")

    monkeypatch.setattr(loading, "apply_adapter", exhausted)
    with pytest.raises(ModelError, match="out of GPU memory merging the adapter .*--load-in-8bit"):
        ChatPoseModel.from_checkpoint(adapter, device="cpu")
    # After the weights, a model that barely fits may run out moving the pose head there.
    monkeypatch.setattr(modeling_chatpose.PoseHead, "to", exhausted)
    with pytest.raises(ModelError, match="out of GPU memory setting up the loaded model"):
        ChatPoseModel.from_checkpoint(lora_checkpoints[1], device="cpu")


def test_an_adapter_that_lacks_tensors_or_has_a_bad_config_is_refused(lora_checkpoints, tmp_path):
    adapter, _ = lora_checkpoints
    damaged = copy_without(
        adapter, tmp_path / "no_b", "adapter/adapter_model.safetensors", "lora_B"
    )
    with pytest.raises(
        CheckpointError, match=r"does not fit the base model \(no weights for .*lora_B"
    ):
        ChatPoseModel.from_checkpoint(damaged, device="cpu")

    shutil.copytree(adapter, tmp_path / "bad_config")
    config = tmp_path / "bad_config" / "adapter" / "adapter_config.json"
    config.write_text("[]")
    with pytest.raises(CheckpointError, match=r"adapter_config.json: expected a JSON object"):
        ChatPoseModel.from_checkpoint(tmp_path / "bad_config", device="cpu")
    config.write_text('{"peft_type": "NO_SUCH_METHOD"}')
    with pytest.raises(CheckpointError, match="cannot load the LoRA adapter"):
        ChatPoseModel.from_checkpoint(tmp_path / "bad_config", device="cpu")

    # An adapter of a deeper base: peft would drop the tensors of layers this base lacks.
    from safetensors.torch import load_file, save_file

    deeper = tmp_path / "deeper"
    shutil.copytree(adapter, deeper)
    weights = deeper / "adapter" / "adapter_model.safetensors"
    tensors = load_file(weights)
    layer0 = {name: t for name, t in tensors.items() if ".layers.0." in name}
    tensors |= {name.replace(".layers.0.", ".layers.7."): t.clone() for name, t in layer0.items()}
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"adapter holds .*layers\.7\..* no place for"):
        ChatPoseModel.from_checkpoint(deeper, device="cpu")

    # An adapter whose saved embeddings are of another vocabulary (trained with more tokens).
    wider = tmp_path / "wider"
    shutil.copytree(adapter, wider)
    weights = wider / "adapter" / "adapter_model.safetensors"
    embeddings = "base_model.model.model.language_model.embed_tokens.weight"
    rows = len(tiny_llava.build_tokenizer()) + 1  # with the pose token
    save_file(
        load_file(weights) | {embeddings: torch.zeros(rows + 4, 64)},
        weights,
        metadata={"format": "pt"},
    )
    with pytest.raises(
        CheckpointError,
        match=rf"adapter's {re.escape(embeddings)} is \({rows + 4}, 64\), the base model's "
        rf"\({rows}, 64\): an adapter of another base, or of a tokenizer with other tokens$",
    ):
        ChatPoseModel.from_checkpoint(wider, device="cpu")


@pytest.mark.parametrize("flag", ["load_in_4bit", "load_in_8bit"])
def test_quantization_without_bitsandbytes_names_the_package(tiny_checkpoint, monkeypatch, flag):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` fail
    # On the CPU the device is what is missing first: installing bitsandbytes would not help.
    option = "--" + flag.replace("_", "-")  # as chatpose-serve and evaluate take it
    with pytest.raises(UnsupportedInputError, match=f"{option}: .* and this runs on the cpu"):
        ChatPoseModel.from_checkpoint(tiny_checkpoint, device="cpu", **{flag: True})
    cuda = (torch.device("cuda"), torch.bfloat16)
    monkeypatch.setattr(loading, "select_device", lambda device: cuda)
    with pytest.raises(MissingDependencyError, match=f"{option} needs the 'bitsandbytes' package"):
        ChatPoseModel.from_checkpoint(tiny_checkpoint, device="cuda", **{flag: True})


def test_quantization_leaves_the_vision_side_and_the_output_layer_as_they_are():
    # transformers 5 matches the skip list from the start of a module's full name: a bare
    # "vision_tower" matched nothing, and CLIP and the projector went into 4 bits.
    from transformers.quantizers.quantizers_utils import should_convert_module

    linear = [
        name
        for name, module in tiny_llava.build_llava(tiny_llava.build_tokenizer()).named_modules()
        if isinstance(module, torch.nn.Linear)
    ]
    kept = {n for n in linear if not should_convert_module(n, loading.UNQUANTIZED_MODULES)}
    vision = {n for n in linear if "vision_tower" in n or "multi_modal_projector" in n}
    assert vision and kept == vision | {"lm_head"}
    assert any(".language_model.layers." in n for n in set(linear) - kept)


def test_device_choice(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert loading.select_device("auto") == (torch.device("cpu"), torch.float32)
    with pytest.raises(UnsupportedInputError, match="--device cuda: CUDA is not available"):
        loading.select_device("cuda")
    with pytest.raises(UnsupportedInputError, match="^--device must be auto, cpu or cuda"):
        loading.select_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    capability = {0: (9, 0), 1: (7, 0)}  # an H100 and a V100, which only emulates bf16
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d: capability[d.index or 0])
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *_, **__: True)  # not asked
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d: (8 << 30, 80 << 30))
    # Named: transformers would put a bare "cuda" on cuda:$LOCAL_RANK, torch on the current one.
    assert loading.select_device("auto") == (torch.device("cuda:0"), torch.bfloat16)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert loading.select_device("cuda") == (torch.device("cuda:1"), torch.float16)
    assert loading.select_device("cuda:1") == (torch.device("cuda:1"), torch.float16)
    with pytest.raises(
        UnsupportedInputError, match=r"--device cuda:7: .* 2 CUDA .*cuda:0 to cuda:1$"
    ):
        loading.select_device("cuda:7")

    def busy(device):  # a card in exclusive-process mode that another process holds
        raise torch.AcceleratorError("CUDA error: CUDA-capable device(s) is/are busy\nmore")

    monkeypatch.setattr(torch.cuda, "mem_get_info", busy)
    with pytest.raises(UnsupportedInputError) as refused:
        loading.select_device("cuda:1")
    assert str(refused.value).startswith("--device cuda:1 cannot be used (CUDA error: CUDA-")
    with pytest.raises(UnsupportedInputError, match=r"^--device auto, which chose cuda:1 cannot"):
        loading.select_device("auto")  # what was typed, and what it became
    assert "more" not in str(refused.value) and "--device cpu" in str(refused.value)


class Activations:
    """Stands in for a forward pass's tensors: only the frames of the failed call hold it."""


@pytest.mark.parametrize("where", ["_backbone", "_encode", "head"])
@pytest.mark.parametrize("path", ["pose", "chat"])
def test_out_of_gpu_memory_anywhere_becomes_a_model_error_after_its_memory_is_let_go(
    tiny_model, monkeypatch, caplog, where, path
):
    failed_pass = []

    def exhausted(*args, **kwargs):
        activations = Activations()
        failed_pass.append(weakref.ref(activations))
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    if path == "chat":  # the head runs once generation has written the pose token
        force = ForceTokens(answer_ids(tiny_model, TEXT, f"Sure, {tiny_model.config.pose_token}."))
        run = lambda: tiny_model.chat(TEXT, max_new_tokens=8, logits_processor=[force])  # noqa: E731
        if where == "_backbone":
            where = "model.generate"
    else:
        run = lambda: tiny_model.predict_poses([PosePrompt(TEXT)])  # noqa: E731
    owner, name = (
        (tiny_model.model, "generate") if where == "model.generate" else (tiny_model, where)
    )
    monkeypatch.setattr(owner, name, exhausted)
    with pytest.raises(ModelError, match="GPU memory for this request: a shorter") as raised:
        run()
    assert raised.value.__cause__ is None and raised.value.__context__ is None
    assert failed_pass and failed_pass[0]() is None  # freed before the error reached the caller
    # The admin's log keeps what torch said, which the client's message leaves out.
    assert "(CUDA out of memory. Tried to allocate 2.00 GiB); chatpose-serve's --max-batch" in (
        caplog.text
    )


# --- checkpoints that must load offline, or be refused by name ---------------------------------


@pytest.fixture
def no_network(monkeypatch):
    """Every attempt to reach the network, recorded (and failed at once): the list. Offline
    mode is off here, as in a process that did not set it, so that nothing is skipped for it."""
    import socket

    import huggingface_hub.constants

    attempts = []

    def refuse(name):
        def refused(*args, **kwargs):
            attempts.append((name, args[:2]))
            raise OSError(f"no network in this test ({name})")

        return refused

    monkeypatch.setattr(socket, "getaddrinfo", refuse("getaddrinfo"))
    monkeypatch.setattr(socket, "create_connection", refuse("create_connection"))
    monkeypatch.setattr(socket.socket, "connect", refuse("connect"))
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(name, "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    return attempts


@pytest.mark.parametrize(
    "base_name",
    # What peft writes for an adapter trained on a Hub model, and what training writes for a
    # relative --base (a folder that is not where the service runs): neither is looked up.
    ["llava-hf/llava-1.5-13b-hf", "runs/llava-base"],
)
def test_an_adapter_naming_a_hub_model_or_a_missing_base_loads_without_the_network(
    lora_checkpoints, tmp_path, no_network, base_name
):
    adapter, _ = lora_checkpoints
    named = edited_copy(
        adapter,
        tmp_path / "named",
        "adapter/adapter_config.json",
        lambda c: c | {"base_model_name_or_path": base_name},
    )
    model = ChatPoseModel.from_checkpoint(named, device="cpu")
    assert no_network == []
    assert len(model.predict_poses([PosePrompt(TEXT)])) == 1


def test_an_adapter_that_saved_its_embeddings_is_not_taken_for_another_base_s(
    tiny_checkpoint, tmp_path, no_network
):
    # peft saves the embeddings with the adapter when training resized them; loading puts
    # them back, so they are no tensors "the base has no place for".
    root = shutil.copytree(tiny_checkpoint, tmp_path / "embeddings")
    processor, base = loading.load_base(root / "base", dtype=torch.float32)
    loading.ensure_pose_token(processor.tokenizer, base, "<POSE>")
    torch.manual_seed(4)
    config = LoraConfig(r=2, init_lora_weights=False, target_modules=["q_proj", "v_proj"])
    with loading.quiet_peft():
        get_peft_model(base, config).save_pretrained(root / "adapter", save_embedding_layers=True)
    ChatPoseModel.from_checkpoint(root, device="cpu")
    assert no_network == []


def _without(*fields):
    return lambda config: {k: v for k, v in config.items() if k not in fields}


def test_a_tokenizer_without_padding_pads_with_unk_or_eos_and_one_without_eos_is_refused(
    tiny_checkpoint, tmp_path
):
    # As the converter does (the release's tokenizer has none): <unk> pads, else </s>.
    for dropped, padding in ((("pad_token",), "<unk>"), (("pad_token", "unk_token"), "</s>")):
        copy = edited_copy(
            tiny_checkpoint, tmp_path / "-".join(dropped), "base/tokenizer_config.json",
            _without(*dropped),
        )  # fmt: skip
        model = ChatPoseModel.from_checkpoint(copy, device="cpu")
        assert model.tokenizer.pad_token == padding
        # Rows of different lengths: the shorter one is padded.
        poses = model.predict_poses([PosePrompt("sit"), PosePrompt(TEXT, (RED,))])
        assert len(poses) == 2 and all(np.isfinite(p).all() for p in poses)
        assert isinstance(model.chat("hello", max_new_tokens=2).text, str)
    # Without an end-of-sequence token a chat reply could never end.
    no_eos = edited_copy(
        tiny_checkpoint, tmp_path / "no-eos", "base/tokenizer_config.json",
        _without("pad_token", "eos_token"),
    )  # fmt: skip
    with pytest.raises(
        CheckpointError, match=r"base/tokenizer_config\.json: the tokenizer has no end-of-seq"
    ):
        ChatPoseModel.from_checkpoint(no_eos, device="cpu")


CUSTOM_CONFIG = """\
import pathlib
pathlib.Path({marker!r}).write_text("the checkpoint's code ran")
from transformers import LlavaConfig
class XConfig(LlavaConfig):
    model_type = "xmodel"
"""
CUSTOM_MODEL = """\
from transformers import LlavaForConditionalGeneration
from .configuration_x import XConfig
class XModel(LlavaForConditionalGeneration):
    config_class = XConfig
"""


@pytest.mark.parametrize("module_prefix", ["", "someorg/somerepo--"], ids=["local", "hub"])
def test_a_base_naming_custom_code_is_refused_without_asking_or_running_it(
    tiny_checkpoint, tmp_path, answers_yes_on_stdin, no_network, module_prefix
):
    marker = tmp_path / "ran"
    root = shutil.copytree(tiny_checkpoint, tmp_path / "custom")
    base = root / "base"
    (base / "configuration_x.py").write_text(CUSTOM_CONFIG.format(marker=str(marker)))
    (base / "modeling_x.py").write_text(CUSTOM_MODEL)
    config = json.loads((base / "config.json").read_text())
    config["model_type"] = "xmodel"
    config["auto_map"] = {
        "AutoConfig": f"{module_prefix}configuration_x.XConfig",
        "AutoModelForImageTextToText": f"{module_prefix}modeling_x.XModel",
    }
    (base / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        CheckpointError, match=r"base/config\.json: auto_map names custom code .*not supported"
    ):
        ChatPoseModel.from_checkpoint(root, device="cpu")
    assert answers_yes_on_stdin == [] and not marker.exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda c: c["text_config"].update(vocab_size=c["text_config"]["vocab_size"] + 10) or c,
            r"base: the weights' \S+\.weight is \(400, 64\), but config\.json makes it "
            r"\(410, 64\), and 1 more tensor\(s\) of other sizes \(a config\.json of another",
        ),
        (
            lambda c: c["text_config"].update(hidden_size=32, head_dim=16) or c,
            r"base: the weights' \S+ is \(\d+(, \d+)?\), but config\.json makes it",
        ),
    ],
    ids=["vocabulary", "hidden-size"],
)
def test_a_config_of_other_sizes_than_the_weights_names_a_tensor_and_both_shapes(
    tiny_checkpoint, tmp_path, change, message
):
    damaged = edited_copy(tiny_checkpoint, tmp_path / "damaged", "base/config.json", change)
    with pytest.raises(CheckpointError, match=message):
        ChatPoseModel.from_checkpoint(damaged, device="cpu")


def test_a_base_without_its_tokenizer_file_names_it(tiny_checkpoint, tmp_path):
    copy = shutil.copytree(tiny_checkpoint, tmp_path / "no-tokenizer")
    (copy / "base" / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match=r"base/tokenizer\.json: file not found"):
        ChatPoseModel.from_checkpoint(copy, device="cpu")


def test_a_base_of_a_language_model_alone_is_refused_naming_its_model_type(
    tiny_checkpoint, tmp_path
):
    from transformers import LlamaConfig, LlamaForCausalLM

    root = shutil.copytree(tiny_checkpoint, tmp_path / "llama")
    shutil.rmtree(root / "base")
    tokenizer = tiny_llava.build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    with pytest.raises(
        CheckpointError,
        match=r"base/config\.json: model_type 'llama' is not a model of images and text",
    ):
        ChatPoseModel.from_checkpoint(root, device="cpu")


def test_a_base_of_another_kind_of_model_is_refused_naming_what_it_lacks(tiny_checkpoint, tmp_path):
    from transformers import (
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    tokenizer = tiny_llava.build_tokenizer()
    config = BlipConfig(
        vision_config={
            "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 2, "image_size": 32, "patch_size": 8,
        },
        text_config={
            "vocab_size": len(tokenizer), "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 1, "num_attention_heads": 2, "encoder_hidden_size": 32,
        },
    )  # fmt: skip
    root = shutil.copytree(tiny_checkpoint, tmp_path / "blip")
    shutil.rmtree(root / "base")
    BlipForConditionalGeneration(config).save_pretrained(root / "base")
    image_processor = BlipImageProcessor(size={"height": 32, "width": 32})
    BlipProcessor(image_processor, tokenizer).save_pretrained(root / "base")
    with pytest.raises(
        CheckpointError,
        match=r"base: BlipForConditionalGeneration \(with BlipProcessor\) lacks .*output "
        r"embeddings.*image token",
    ):
        ChatPoseModel.from_checkpoint(root, device="cpu")
