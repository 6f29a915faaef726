"""The converter, on a tiny checkpoint this test writes in the official release's layout."""

import json
import logging
import os
import re
import shutil
import signal

import numpy as np
import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from tokenizers import AddedToken
from transformers import AutoProcessor, AutoTokenizer, CLIPConfig, CLIPModel

from inference_service import convert_official
from inference_service.checkpoint import ChatPoseConfig
from inference_service.convert_official import convert, main
from inference_service.errors import CheckpointError
from inference_service.loading import save_processor
from inference_service.modeling_chatpose import ChatPoseModel, PosePrompt
from shared_protocol.rotations import axis_angle_to_matrix

from . import tiny_llava
from .forcing import ForceTokens, answer_ids

OFFICIAL_TOKENS = ("<unk>", "<s>", "</s>", *tiny_llava.OFFICIAL_EXTRA_TOKENS)
REQUESTS = [
    PosePrompt("a man raising both arms"),
    PosePrompt(images=(tiny_llava.image_bytes((9, 99, 199)),)),
]


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """(official-layout dir, CLIP dir, the same model in this project's format).

    The reference checkpoint's tokenizer is the official one with the release's added tokens
    stripping the whitespace around them (as its transformers 4.31 did), plus "<image>" at the
    end, which is what the converter makes of it, so both must give the same poses.
    """
    root = tmp_path_factory.mktemp("release")
    official_tokenizer = tiny_llava.build_tokenizer(OFFICIAL_TOKENS)
    tokenizer = tiny_llava.build_tokenizer(OFFICIAL_TOKENS)
    for token in tiny_llava.OFFICIAL_EXTRA_TOKENS:
        stripped = AddedToken(token, lstrip=True, rstrip=True, normalized=False, special=True)
        tokenizer.add_tokens([stripped], special_tokens=True)
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    model = tiny_llava.build_llava(tokenizer, seed=5)
    head = tiny_llava.build_head(seed=6)
    reference = tiny_llava.write_checkpoint(
        root / "reference",
        model,
        tiny_llava.build_processor(tokenizer),
        head,
        pose_token="[SEG]",
        mm_use_im_start_end=True,
        prompt_wording="release",
    )

    source = root / "official"
    source.mkdir()
    official_tokenizer.save_pretrained(source)
    text = model.config.text_config
    (source / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["ChatPoseForCausalLM"],
                "model_type": "llava",
                "hidden_size": text.hidden_size,
                "intermediate_size": text.intermediate_size,
                "num_hidden_layers": text.num_hidden_layers,
                "num_attention_heads": text.num_attention_heads,
                "num_key_value_heads": text.num_key_value_heads,
                "max_position_embeddings": text.max_position_embeddings,
                "rms_norm_eps": text.rms_norm_eps,
                "rope_theta": text.rope_parameters["rope_theta"],
                "vocab_size": len(official_tokenizer),
                # openai/clip-vit-large-patch14-336 in the release; this CLIP is as small
                "mm_vision_tower": f"clip-vit-tiny-patch{tiny_llava.PATCH}-{tiny_llava.IMAGE_SIZE}",
                "mm_vision_select_layer": -2,
                "mm_vision_select_feature": "patch",
                "mm_projector_type": "mlp2x_gelu",
                "mm_use_im_start_end": False,  # as LLaVA-1.5's config; the release wraps anyway
                "out_dim": 144,
            }
        )
    )
    # The release's names (LLaVA's layout), written out here rather than taken
    # from the converter's own table, so that a wrong table fails this test.
    official = {
        "model.language_model.embed_tokens.": "model.embed_tokens.",
        "model.language_model.layers.": "model.layers.",
        "model.language_model.norm.": "model.norm.",
        "lm_head.": "lm_head.",
        "model.multi_modal_projector.linear_1.": "model.mm_projector.0.",
        "model.multi_modal_projector.linear_2.": "model.mm_projector.2.",
    }
    weights = {}
    for name, tensor in model.state_dict().items():
        for ours, theirs in official.items():
            if name.startswith(ours):
                weights[theirs + name[len(ours) :]] = tensor
    # The official vocabulary has no "<image>" row: original LLaVA splices images in by index.
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        weights[name] = weights[name][: len(official_tokenizer)]
    weights.update({f"model.text_hidden_fcs.0.{k}": v for k, v in head.state_dict().items()})
    weights["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    weights["model.smplx.shapedirs"] = torch.zeros(2, 3)  # the release saves its body model too
    weights["model.unknown_extra"] = torch.zeros(1)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(source / "model.safetensors"))

    # The vision tower as a full CLIP model directory, as openai/clip-vit-large-patch14-336 is.
    clip = CLIPModel(
        CLIPConfig(
            vision_config=tiny_llava.vision_config().to_dict(),
            text_config={
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "vocab_size": 100,
                "bos_token_id": 0,
                "eos_token_id": 1,
                "pad_token_id": 1,
            },
        )
    )
    clip.vision_model.load_state_dict(model.model.vision_tower.state_dict())
    clip.save_pretrained(root / "clip")
    return source, root / "clip", reference


def test_converted_release_gives_the_same_poses_as_the_source_weights(release, tmp_path, capsys):
    source, clip, reference = release
    logged = []  # what transformers logs, whichever stream its handler holds
    handler = logging.Handler()
    handler.emit = logged.append
    logging.getLogger("transformers").addHandler(handler)
    try:
        converted = convert(source, tmp_path / "converted", clip)
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    # Known leftovers (SMPL-X buffers, rotary frequencies) pass silently, others are reported.
    assert "ignored 1 unknown tensors, e.g. model.unknown_extra" in capsys.readouterr().err
    # Not transformers' list of the full CLIP folder's text-model weights (200 lines for a real
    # one): the vision tower's own missing weights are checked and named instead.
    assert not [r for r in logged if "text_model" in r.getMessage()]
    config = ChatPoseConfig.load(converted)
    assert (config.pose_token, config.mm_use_im_start_end, config.image_size) == ("[SEG]", True, 32)
    assert config.posed_joints == 22  # the release's "hands" are SMPL-H fingers

    model = ChatPoseModel.from_checkpoint(converted, device="cpu")
    expected = ChatPoseModel.from_checkpoint(reference, device="cpu")
    assert model.pose_token_id == model.tokenizer.convert_tokens_to_ids("[SEG]")
    assert model.pose_token_id == expected.pose_token_id
    assert config.pose_orientation == "camera"  # HMR 2.0's targets, and its PoseScript loader's
    assert config.prompt_wording == "release"  # its training code's questions
    for got, want in zip(
        model.predict_poses(REQUESTS), expected.predict_poses(REQUESTS), strict=True
    ):
        np.testing.assert_allclose(got[1:22], want[1:22], atol=1e-5)
        assert np.abs(want[22:]).max() > 1e-3  # the head does give them a rotation
        np.testing.assert_array_equal(got[22:], 0.0)  # which the service leaves out
        # Every pose, of text or of an image, is turned out of the camera's frame.
        np.testing.assert_allclose(
            axis_angle_to_matrix(got[0]),
            np.diag([1.0, -1.0, -1.0]) @ axis_angle_to_matrix(want[0]),
            atol=1e-5,
        )

    # The release's "[SEG]" is written as "<POSE>" in replies.
    answer = "Sure, it is [SEG]."
    forced = answer_ids(model, "Pose?", answer)
    reply = model.chat("Pose?", logits_processor=[ForceTokens(forced)])
    assert reply.text == "Sure, it is <POSE>."
    assert len(reply.poses) == 1
    # The pose token takes the spaces on both sides; the reply still reads as words.
    answer = "First [SEG] then [SEG]."
    forced = answer_ids(model, "Two poses?", answer)
    reply = model.chat("Two poses?", logits_processor=[ForceTokens(forced)])
    assert reply.text == "First <POSE> then <POSE>."


def test_added_tokens_take_the_whitespace_around_them_as_the_release_s_tokenizer_did(
    release, tmp_path
):
    source, clip, _ = release
    official = AutoTokenizer.from_pretrained(source)
    converted = AutoTokenizer.from_pretrained(convert(source, tmp_path / "out", clip) / "base")

    def tokens(tokenizer, text: str) -> list[str]:
        return tokenizer.convert_ids_to_tokens(tokenizer(text, add_special_tokens=False).input_ids)

    answer = "Sure, it is [SEG]."
    assert tokens(official, answer)[-4:-1] == ["Ġis", "Ġ", "[SEG]"]  # a lone space's state
    assert tokens(converted, answer)[-3:] == ["Ġis", "[SEG]", "."]
    image = "USER: <im_start><image><im_end>\nCan you"
    assert tokens(converted, image) == ["USE", "R", ":", "<im_start>", "<image>", "<im_end>",
                                        "Can", "Ġyou"]  # fmt: skip


def test_missing_weight_is_named_by_its_official_name(release, tmp_path):
    source, clip, _ = release
    broken = tmp_path / "broken"
    broken.mkdir()
    for file in source.iterdir():
        (broken / file.name).write_bytes(file.read_bytes())
    from safetensors.torch import load_file

    weights = load_file(str(broken / "model.safetensors"))
    del weights["model.norm.weight"]
    save_file(weights, str(broken / "model.safetensors"))
    with pytest.raises(CheckpointError, match="no weights for model.norm.weight"):
        convert(broken, tmp_path / "out", clip)

    del weights["model.text_hidden_fcs.0.2.bias"]
    weights["model.norm.weight"] = torch.ones(tiny_llava.HIDDEN)
    save_file(weights, str(broken / "model.safetensors"))
    with pytest.raises(CheckpointError, match="no weights for model.text_hidden_fcs.0.2.bias"):
        convert(broken, tmp_path / "out2", clip)
    assert not (tmp_path / "out2").exists()  # nothing half-written: a rerun can go there
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


def test_a_vision_tower_of_another_size_or_with_weights_missing_is_refused(release, tmp_path):
    source, clip, _ = release
    other = tmp_path / "other"
    shutil.copytree(source, other)
    config = json.loads((other / "config.json").read_text())
    config["mm_vision_tower"] = "openai/clip-vit-large-patch14-336"
    (other / "config.json").write_text(json.dumps(config))
    expected = (
        r"names the vision tower openai/clip-vit-large-patch14-336 \(336 px\), "
        rf"but --vision-tower {clip} takes {tiny_llava.IMAGE_SIZE} px"
    )
    with pytest.raises(CheckpointError, match=expected):
        convert(other, tmp_path / "out", clip)
    config["mm_vision_tower"] = "openai/clip-vit-large-patch14"  # OpenAI's 224-px one
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"patch14 \(224 px\)"):
        convert(other, tmp_path / "out", clip)
    config["mm_vision_tower"] = "laion/CLIP-ViT-L-14-laion2B-s32B-b82K"  # a name without a size
    (other / "config.json").write_text(json.dumps(config))
    convert(other, tmp_path / "laion", clip)

    from safetensors.torch import load_file

    damaged = tmp_path / "clip"
    shutil.copytree(clip, damaged)
    weights = load_file(str(damaged / "model.safetensors"))
    del weights["vision_model.encoder.layers.0.mlp.fc1.weight"]
    save_file(weights, str(damaged / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"no weights for encoder.layers.0.mlp.fc1.weight"):
        convert(source, tmp_path / "out", damaged)
    assert not (tmp_path / "out").exists()


def test_a_sentencepiece_tokenizer_reads_text_after_an_added_token_as_the_release_s_did(
    tmp_path,
):
    # The release's transformers (4.31) read its Llama tokenizer in legacy mode, unless its
    # tokenizer_config.json said otherwise: the text after an added token starts a word
    # ("▁Can"). Transformers 5 defaults to the other mode ("C", "an"), and forgets the mode
    # when it saves a tokenizer.
    from tokenizers import AddedToken as Added
    from transformers import AutoTokenizer, LlamaTokenizer

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "▁": 3, "C": 4, "a": 5, "n": 6, "an": 7, "▁C": 8}
    sentencepiece = LlamaTokenizer(
        vocab={**vocab, "▁Can": 9}, merges=[("a", "n"), ("▁", "C"), ("▁C", "an")]
    )
    added = [Added(t, special=True) for t in ("[SEG]", "<im_start>", "<im_end>")]
    sentencepiece.add_tokens(added, special_tokens=True)
    source = tmp_path / "release"
    sentencepiece.save_pretrained(source)
    settings = json.loads((source / "tokenizer_config.json").read_text())
    settings.pop("legacy", None)  # as 4.31 wrote it: the mode was its default
    (source / "tokenizer_config.json").write_text(json.dumps(settings))

    def read(tokenizer):
        return tokenizer.convert_ids_to_tokens(tokenizer("<im_end>\nCan").input_ids)

    assert read(AutoTokenizer.from_pretrained(source)) == ["<im_end>", "C", "an"]
    converted = convert_official._read_tokenizer(source, "[SEG]")
    assert read(converted) == ["<im_end>", "▁Can"]
    base = tmp_path / "base"  # saved as the converter and training save it, then read back
    processor = convert_official._processor(converted, tiny_llava.vision_config(), "default")
    save_processor(processor, base)
    convert_official._check_saved_tokenizer(base, source, converted, "[SEG]")
    assert read(AutoProcessor.from_pretrained(base).tokenizer) == ["<im_end>", "▁Can"]

    settings["legacy"] = False  # a release that said so is read so
    (source / "tokenizer_config.json").write_text(json.dumps(settings))
    assert read(convert_official._read_tokenizer(source, "[SEG]")) == ["<im_end>", "C", "an"]


def copy_with(source, destination, change):
    """A copy of the release dir `source` whose weights `change(weights)` has edited."""
    from safetensors.torch import load_file

    shutil.copytree(source, destination)
    weights = load_file(str(destination / "model.safetensors"))
    change(weights)
    save_file(weights, str(destination / "model.safetensors"))
    return destination


def test_weights_that_would_be_dropped_are_refused_not_lost(release, tmp_path):
    source, clip, _ = release
    hidden = tiny_llava.HIDDEN

    def unmerged_lora(weights):
        weights["model.layers.0.self_attn.q_proj.lora_A.default.weight"] = torch.zeros(4, hidden)
        weights["model.layers.0.self_attn.q_proj.lora_B.default.weight"] = torch.zeros(hidden, 4)

    lora = copy_with(source, tmp_path / "lora", unmerged_lora)
    with pytest.raises(
        CheckpointError, match=r"model\.layers\.0\.self_attn\.q_proj\.lora_A.* un-merged LoRA"
    ):
        convert(lora, tmp_path / "out", clip)

    # peft's newer layout moves the layer's own weight to base_layer; a whole wrapped model's
    # state starts base_model.model.: both were "no weights for ...", not called LoRA.
    def moved_to_base_layer(weights):
        name = "model.layers.0.self_attn.q_proj"
        weights[f"{name}.base_layer.weight"] = weights.pop(f"{name}.weight")
        unmerged_lora(weights)

    def wrapped(weights):
        for name in list(weights):
            weights[f"base_model.model.{name}"] = weights.pop(name)

    for change, named in ((moved_to_base_layer, "q_proj.base_layer"), (wrapped, "base_model")):
        other = copy_with(source, tmp_path / change.__name__, change)
        with pytest.raises(CheckpointError, match=rf"{named}.* un-merged LoRA model; merge"):
            convert(other, tmp_path / "out", clip)

    def biased(weights):
        weights["model.layers.1.self_attn.q_proj.bias"] = torch.zeros(hidden)

    bias = copy_with(source, tmp_path / "bias", biased)
    with pytest.raises(CheckpointError, match=r"q_proj\.bias have no place in a LLaVA-Llama"):
        convert(bias, tmp_path / "out", clip)
    assert not (tmp_path / "out").exists()


def test_a_pose_head_of_another_width_is_refused_by_name(release, tmp_path):
    source, clip, _ = release

    def wider(weights):
        first = weights["model.text_hidden_fcs.0.0.weight"]
        weights["model.text_hidden_fcs.0.0.weight"] = torch.zeros(
            first.shape[0], first.shape[1] + 8
        )

    head = copy_with(source, tmp_path / "head", wider)
    with pytest.raises(CheckpointError, match=r"the SMPL head .* reads \d+ numbers, but the"):
        convert(head, tmp_path / "out", clip)


def test_a_head_of_another_output_size_is_refused_at_conversion(release, tmp_path):
    source, clip, _ = release

    def fewer(weights):  # the checkpoint would be written, then refuse to load
        for name in ("model.text_hidden_fcs.0.2.weight", "model.text_hidden_fcs.0.2.bias"):
            weights[name] = weights[name][:-1]

    head = copy_with(source, tmp_path / "head", fewer)
    with pytest.raises(CheckpointError, match=r"2\.weight\) gives 143 numbers, not 144"):
        convert(head, tmp_path / "out", clip)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("field", "value"),
    [("hidden_size", 64.0), ("num_hidden_layers", "2"), ("mm_vision_select_feature", ["patch"])],
)
def test_a_config_field_of_the_wrong_type_is_named(release, tmp_path, field, value):
    source, clip, _ = release
    other = tmp_path / "other"
    shutil.copytree(source, other)
    config = json.loads((other / "config.json").read_text())
    config[field] = value
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=f"config.json: field '{field}' is "):
        convert(other, tmp_path / "out", clip)
    (other / "config.json").write_text("[]")
    with pytest.raises(CheckpointError, match="config.json: expected a JSON object"):
        convert(other, tmp_path / "out", clip)


def test_command_line_reports_errors_and_refuses_a_full_destination(release, tmp_path, capsys):
    source, clip, _ = release
    assert (
        main([str(tmp_path / "nowhere"), str(tmp_path / "out"), "--vision-tower", str(clip)]) == 2
    )
    assert "config.json: file not found" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "file").write_text("x")
    assert main([str(source), str(tmp_path / "full"), "--vision-tower", str(clip)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert main([str(source), str(tmp_path / "ok"), "--vision-tower", str(clip)]) == 0
    assert (tmp_path / "ok" / "chatpose.json").is_file()
    said = capsys.readouterr().out
    assert "images wrapped in <im_start>...<im_end>; joints 22 to 23 at rest" in said
    missing_clip = ["--vision-tower", str(tmp_path / "no-clip")]
    assert main([str(source), str(tmp_path / "ok2"), *missing_clip]) == 2
    assert "no-clip: no such folder" in capsys.readouterr().err


def test_a_destination_that_is_a_file_is_called_a_file(release, tmp_path, capsys):
    # It was "exists and is not empty", as a full folder is.
    source, clip, _ = release
    (tmp_path / "ckpt").write_text("notes\n")
    assert main([str(source), str(tmp_path / "ckpt"), "--vision-tower", str(clip)]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'ckpt'}: a file, not a folder; DST is the folder" in err
    assert "not empty" not in err
    assert (tmp_path / "ckpt").read_text() == "notes\n"


def test_a_hugging_face_llava_folder_is_named_as_one_with_what_the_release_holds(
    release, tmp_path, capsys
):
    # A transformers LLaVA (llava-hf/..., or a converted checkpoint's base/) was refused with
    # "missing field 'hidden_size'", as if the release's config.json lacked a field.
    source, clip, reference = release
    hugging_face = reference / "base"  # what LlavaForConditionalGeneration.save_pretrained wrote
    assert json.loads((hugging_face / "config.json").read_text())["model_type"] == "llava"
    assert main([str(hugging_face), str(tmp_path / "out"), "--vision-tower", str(clip)]) == 2
    err = capsys.readouterr().err
    assert "missing field" not in err
    assert (
        f"{hugging_face / 'config.json'}: a Hugging Face transformers llava checkpoint (its "
        "language model's settings in text_config), not the official ChatPose release" in err
    )
    for named in ("hidden_size", "mm_vision_tower", "model.mm_projector.*", "text_hidden_fcs"):
        assert named in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("config", "transformers"),
    [
        ({"text_config": {"hidden_size": 8}}, True),  # either mark of transformers' layout
        ({"architectures": ["LlavaForConditionalGeneration"]}, True),
        ({"architectures": ["LlavaLlamaForCausalLM"]}, False),  # the release's own, cut short
        ({"text_config": {}, "hidden_size": 8}, False),  # the Llama fields at the top: read on
    ],
)
def test_a_config_is_told_apart_by_where_its_llama_fields_are(tmp_path, config, transformers):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "llava", **config}))
    with pytest.raises(CheckpointError) as refused:
        convert_official._read_config(path)
    assert ("a Hugging Face transformers llava checkpoint" in str(refused.value)) == transformers
    assert ("missing field" in str(refused.value)) != transformers


def test_a_source_that_is_not_the_release_s_folder_says_where_to_look(release, tmp_path):
    source, clip, _ = release
    cache = tmp_path / "models--YaoFeng--CHATPOSE-V0"  # the top of a Hugging Face cache
    (cache / "snapshots").mkdir(parents=True)
    (cache / "snapshots" / "0123abc").symlink_to(source, target_is_directory=True)
    cases = [
        (source.parent, f"no config.json; folders in it that hold one: {clip}, {source}"),
        (cache, f"no config.json; folders in it that hold one: {cache / 'snapshots' / '0123abc'}"),
        (tmp_path / "empty", "no config.json (SRC is the release's folder)"),
        (source / "model.safetensors", "a file; SRC is the release's folder"),
    ]
    (tmp_path / "empty").mkdir()
    for given, message in cases:
        with pytest.raises(CheckpointError, match=re.escape(f"{given}: {message}")):
            convert(given, tmp_path / "out", clip)
    assert not (tmp_path / "out").exists()


def test_a_destination_through_a_link_or_named_dot_or_tilde_is_written(
    release, tmp_path, monkeypatch
):
    # The temporary folder went beside the link (or "."), and the last rename failed after
    # the whole conversion, leaving the copy behind; "~" was a folder named so. The user's
    # empty folder is filled, not replaced: a shell standing in it sees the files.
    source, clip, _ = release
    (tmp_path / "disk").mkdir()
    (tmp_path / "disk" / "target").mkdir()
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "ckpt").symlink_to(tmp_path / "disk" / "target")
    assert main([str(source), str(tmp_path / "work" / "ckpt"), "--vision-tower", str(clip)]) == 0
    assert (tmp_path / "disk" / "target" / "chatpose.json").is_file()
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    assert main([str(source), ".", "--vision-tower", str(clip)]) == 0
    assert "chatpose.json" in os.listdir(".")
    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copytree(clip, tmp_path / "clip")
    assert main([str(source), "~/home-ckpt", "--vision-tower", "~/clip"]) == 0
    assert (tmp_path / "home-ckpt" / "chatpose.json").is_file()
    leftovers = [p for p in tmp_path.rglob("*.tmp")]
    assert leftovers == []


def test_a_destination_that_cannot_be_written_is_refused_before_the_weights_load(
    release, tmp_path, monkeypatch, read_only
):
    source, clip, _ = release
    locked = tmp_path / "locked"
    locked.mkdir()
    read_only(locked)
    monkeypatch.setattr(convert_official, "_read_weights", lambda *a: pytest.fail("loaded"))
    with pytest.raises(CheckpointError, match=f"ckpt: cannot write in {locked}"):
        convert(source, locked / "ckpt", clip)


def test_a_vision_tower_folder_without_its_config_is_named(release, tmp_path):
    # CLIP's defaults were taken instead, and the folder called a 224-px model.
    source, clip, _ = release
    cache = tmp_path / "models--openai--clip-vit-large-patch14-336"
    (cache / "snapshots").mkdir(parents=True)
    with pytest.raises(CheckpointError, match=r"336: no config\.json .*snapshots/<hash>"):
        convert(source, tmp_path / "out", cache)


def test_a_conversion_stopped_by_sigterm_leaves_nothing_behind(
    release, tmp_path, monkeypatch, capsys
):
    source, clip, _ = release
    reached_outside = []
    previous = signal.signal(signal.SIGTERM, lambda n, frame: reached_outside.append(n))

    def terminated(*args):  # the terminal closing, a `kill`, while the copy is written
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(convert_official, "_check_saved_tokenizer", terminated)
    try:
        code = main([str(source), str(tmp_path / "out"), "--vision-tower", str(clip)])
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert code == 130 and reached_outside == []
    assert "interrupted; nothing was written" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "failure, message",
    [
        (CheckpointError("the converted tokenizer reads it otherwise"), "reads it otherwise"),
        # A full disk, as safetensors, the tokenizers library and Python say it.
        (
            SafetensorError("Error while serializing: I/O error: No space left (os error 28)"),
            "could not be written (a full disk?): Error while serializing",
        ),
        (Exception("No space left on device (os error 28)"), "written (a full disk?): No space"),
        (OSError(28, "No space left on device"), "could not be written: [Errno 28] No space"),
    ],
)
def test_a_conversion_that_fails_while_writing_leaves_nothing_behind(
    release, tmp_path, monkeypatch, capsys, failure, message
):
    source, clip, _ = release

    def fails(*args):
        raise failure

    monkeypatch.setattr(convert_official, "_check_saved_tokenizer", fails)
    out = tmp_path / "out"
    assert main([str(source), str(out), "--vision-tower", str(clip)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    # a write failure is named by the folder (the libraries name no path)
    assert (f"convert_official: {out}: could not" in err) == ("written" in message)
    assert list(tmp_path.iterdir()) == []  # neither the checkpoint nor its temporary folder


def test_a_conversion_out_of_memory_says_how_much_it_holds(release, tmp_path, monkeypatch, capsys):
    source, clip, _ = release

    def exhausted(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(convert_official, "_read_weights", exhausted)
    assert main([str(source), str(tmp_path / "out"), "--vision-tower", str(clip)]) == 2
    assert "out of memory: the conversion holds one copy of the weights" in capsys.readouterr().err


def test_a_machine_with_less_memory_free_than_the_weights_is_told_before_reading(
    release, tmp_path, monkeypatch, capsys
):
    # The system kills the conversion part way, with no word (MemoryError rarely comes first).
    source, clip, _ = release
    weights = sum(f.stat().st_size for f in source.glob("*.safetensors"))
    monkeypatch.setattr(convert_official, "free_host_memory", lambda: weights - 1)
    read = []
    monkeypatch.setattr(convert_official, "load_file", lambda *a: read.append(a) or {})
    assert main([str(source), str(tmp_path / "out"), "--vision-tower", str(clip)]) == 2
    assert "GB of memory to convert, and this machine has" in capsys.readouterr().err
    assert not read and not (tmp_path / "out").exists()


def test_wrong_pose_token_is_reported(release, tmp_path):
    source, clip, _ = release
    with pytest.raises(CheckpointError, match="no pose token '<POSE>'"):
        convert(source, tmp_path / "out", clip, pose_token="<POSE>")


def test_unreadable_weights_are_reported(release, tmp_path):
    source, clip, _ = release
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_bytes((source / "config.json").read_bytes())
    (broken / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="model.safetensors: cannot read the weights"):
        convert(broken, tmp_path / "out", clip)


def test_a_shard_missing_from_its_index_is_named(release, tmp_path):
    source, clip, _ = release
    copy = tmp_path / "release"
    shutil.copytree(source, copy)
    (copy / "model.safetensors").rename(copy / "model-00001-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}
    (copy / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(
        CheckpointError, match=r"lists the shard model-00002-of-00002.safetensors, which the"
    ):
        convert(copy, tmp_path / "out", clip)
    (copy / "model.safetensors.index.json").write_text('{"weight_map": []}')
    with pytest.raises(CheckpointError, match=r"index.json: not a readable weights index"):
        convert(copy, tmp_path / "out", clip)


def test_an_already_converted_checkpoint_is_named(release, tmp_path):
    source, clip, converted = release
    with pytest.raises(CheckpointError, match=r"already a ChatPose checkpoint \(chatpose.json\)"):
        convert(converted, tmp_path / "out", clip)


def test_a_sentencepiece_tokenizer_without_its_packages_names_them(release, tmp_path, monkeypatch):
    source, clip, _ = release
    copy = tmp_path / "release"
    shutil.copytree(source, copy)
    (copy / "tokenizer.json").unlink()  # as the release saves it: tokenizer.model alone
    (copy / "tokenizer.model").write_bytes(b"\x0a\x05")
    monkeypatch.setattr(convert_official, "_installed", lambda module: module != "sentencepiece")
    with pytest.raises(CheckpointError, match="pip install sentencepiece protobuf"):
        convert(copy, tmp_path / "out", clip)
    monkeypatch.setattr(convert_official, "_installed", lambda module: True)
    with pytest.raises(CheckpointError, match="release: cannot read the tokenizer"):
        convert(copy, tmp_path / "out", clip)  # installed, but this tokenizer.model is junk
    assert not (tmp_path / "out").exists()


def test_a_tokenizer_naming_custom_code_is_refused_without_asking_or_running_it(
    release, tmp_path, answers_yes_on_stdin
):
    source, clip, _ = release
    copy = tmp_path / "release"
    shutil.copytree(source, copy)
    marker = tmp_path / "ran"
    (copy / "tokenization_x.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('the release\\'s code ran')\n"
        "from transformers import PreTrainedTokenizerFast\n"
        "class XTokenizer(PreTrainedTokenizerFast):\n    pass\n"
    )
    # A model type transformers does not know has no tokenizer of its own there: it would ask.
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps(config | {"model_type": "chatpose"}))
    settings = json.loads((copy / "tokenizer_config.json").read_text())
    settings["tokenizer_class"] = "XTokenizer"
    settings["auto_map"] = {"AutoTokenizer": [None, "tokenization_x.XTokenizer"]}
    (copy / "tokenizer_config.json").write_text(json.dumps(settings))
    with pytest.raises(
        CheckpointError,
        match=r"release/tokenizer_config\.json: auto_map names custom code .*not supported",
    ):
        convert(copy, tmp_path / "out", clip)
    assert answers_yes_on_stdin == [] and not marker.exists()
    assert not (tmp_path / "out").exists()


def test_a_tokenizer_without_an_end_of_sequence_token_is_refused_by_name(release, tmp_path):
    source, clip, _ = release
    copy = tmp_path / "release"
    shutil.copytree(source, copy)
    settings = json.loads((copy / "tokenizer_config.json").read_text())
    settings.pop("eos_token", None)
    (copy / "tokenizer_config.json").write_text(json.dumps(settings))
    with pytest.raises(
        CheckpointError, match=r"release/tokenizer_config\.json: the tokenizer has no end-of-seq"
    ):
        convert(copy, tmp_path / "out", clip)


def test_the_converter_works_offline_whatever_the_environment_said(
    release, tmp_path, monkeypatch, capsys
):
    import os

    import huggingface_hub.constants

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(name, "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    assert main([str(tmp_path / "nowhere"), str(tmp_path / "out"), "--vision-tower", "x"]) == 2
    assert os.environ["HF_HUB_OFFLINE"] == "1" and huggingface_hub.constants.HF_HUB_OFFLINE
