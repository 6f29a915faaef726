"""The scaffold: a fresh small LLaVA written as a checkpoint the service loads."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image
from transformers import PreTrainedTokenizerFast

from inference_service.backend import ModelBackend
from inference_service.checkpoint import Checkpoint
from inference_service.errors import UnsupportedInputError
from inference_service.modeling_chatpose import ChatPoseModel, PosePrompt
from inference_service.prompts import Exchange
from inference_service.scheduler import WorkItem
from inference_service.serve import DEMO_CHECKPOINT
from inference_service.training import scaffold
from inference_service.training.scaffold import SIZES


def test_tiny_scaffold_loads_and_predicts(tmp_path):
    root = scaffold.scaffold_checkpoint(tmp_path / "ckpt", "tiny", texts=["a dancer spins"])
    checkpoint = Checkpoint.open(root)
    assert checkpoint.adapter_dir is None
    assert checkpoint.config.hidden_size == SIZES["tiny"].hidden_size
    assert checkpoint.config.image_size == SIZES["tiny"].image_size
    assert json.loads((root / "scaffold.json").read_text())["size"]["num_layers"] == 2
    model = ChatPoseModel.from_checkpoint(root, device="cpu")
    tokenizer = model.tokenizer
    # Both markers are single tokens already: loading did not have to grow the vocabulary.
    vocab = tokenizer.get_vocab()
    assert "<POSE>" in vocab and "<image>" in vocab
    assert model.model.get_input_embeddings().weight.shape[0] == len(tokenizer)
    ids = tokenizer("Sure, it is <POSE>.", add_special_tokens=False)["input_ids"]
    assert ids.count(model.pose_token_id) == 1
    assert tokenizer.decode(ids) == "sure, it is <POSE>."
    poses = model.predict_poses([PosePrompt("a man raising his arms")])
    assert poses[0].shape == (24, 3) and np.isfinite(poses[0]).all()


def test_the_tokenizer_reads_whole_lower_case_words_with_sides_bound():
    tokenizer = scaffold.build_tokenizer(["The left arm is up and the right knee is bent."])
    tokens = tokenizer.tokenize("THE Left Arm is up.")
    assert tokens == ["the", "left_arm", "is", "up", "."]
    # A bag of these words still knows which side is which.
    one = tokenizer("the left arm is up and the right knee is bent")["input_ids"]
    other = tokenizer("the right arm is up and the left knee is bent")["input_ids"]
    assert sorted(one) != sorted(other)
    # A word never seen is <unk> as a whole, not pieces of known words ("un" + "bent").
    unknown = tokenizer("unbent", add_special_tokens=False)["input_ids"]
    assert unknown == [tokenizer.unk_token_id]
    assert tokenizer.decode(one, skip_special_tokens=True) == (
        "the left arm is up and the right knee is bent"
    )


@pytest.mark.parametrize(
    "pasted",
    [
        "raise your left\u00a0arm",  # a web page's or Word's no-break space
        "raise your left\u3000arm",  # an input method's ideographic space
        "ｒａｉｓｅ ｙｏｕｒ ｌｅｆｔ ａｒｍ",  # full-width letters
        "raise your left\u200barm",  # a zero-width space between words
        "raise\tyour  left\n arm",  # tabs, a doubled space, a line break
        "raise your le\u200dft arm",  # a joiner inside a word
    ],
)
def test_text_pasted_with_other_spaces_or_wide_letters_reads_as_typed(pasted):
    # The no-break space lost the side: "left" and an unknown word, a near-neutral pose.
    typed = "raise your left arm"
    tokenizer = scaffold.build_tokenizer([typed])
    assert tokenizer.tokenize(pasted) == tokenizer.tokenize(typed) == ["raise", "your", "left_arm"]
    shipped = PreTrainedTokenizerFast(tokenizer_file=str(DEMO_CHECKPOINT / "base/tokenizer.json"))
    assert shipped.tokenize(pasted) == shipped.tokenize(typed)


def test_a_prompt_of_words_the_model_never_saw_is_refused_by_the_service(tmp_path):
    # Every word <unk>: the answer would be the same pose whatever the prompt says.
    root = scaffold.scaffold_checkpoint(tmp_path / "ckpt", "tiny", texts=["raise the left arm"])
    serving = ChatPoseModel.from_checkpoint(root, device="cpu", refuse_guesses=True)
    for prompt in ["左腕を上げてください", "поднимите левую руку", "x" * 500]:
        with pytest.raises(UnsupportedInputError, match="^prompt: this model knows none of its"):
            serving.predict_poses([PosePrompt(prompt)])
        with pytest.raises(UnsupportedInputError, match="^prompt: this model knows none of its"):
            serving.chat(prompt, max_new_tokens=2)
    for never_seen in ("dance", "dance.", "Dance!"):  # English it never saw; punctuation no word
        with pytest.raises(UnsupportedInputError, match="say it in words it was trained on"):
            serving.predict_poses([PosePrompt(never_seen)])
    # With history too: "again" is as unknown as "dance", and would answer the same.
    earlier = (Exchange("raise the left arm", "sure, it is <POSE>."),)
    with pytest.raises(UnsupportedInputError, match="this model knows none of its words"):
        serving.chat("もう一度", history=earlier, max_new_tokens=2)
    assert len(serving.predict_poses([PosePrompt(".")])) == 1  # every token known: no guess
    # The service's backend refuses such a line on its own, the others in the same pass.
    passes = []
    predict = serving.predict_poses
    serving.predict_poses = lambda requests: passes.append(len(requests)) or predict(requests)
    lines = [WorkItem("raise the left arm"), WorkItem("dance"), WorkItem("raise the arm")]
    answers = ModelBackend(serving, "tiny").answer_poses(lines)
    assert [type(a).__name__ for a in answers] == ["Answer", "UnsupportedInputError", "Answer"]
    assert passes == [2]
    del serving.predict_poses
    # One known word, or a picture to read, is enough; training and evaluation take all.
    assert len(serving.predict_poses([PosePrompt("左腕を上げて: left arm")])) == 1
    pixels = np.random.default_rng(0).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    picture = buffer.getvalue()
    assert len(serving.predict_poses([PosePrompt("左腕を上げて", (picture,))])) == 1
    evaluating = ChatPoseModel.from_checkpoint(root, device="cpu")
    assert len(evaluating.predict_poses([PosePrompt("左腕を上げてください")])) == 1


def test_same_seed_same_weights_and_refuses_nonempty_out(tmp_path):
    a = scaffold.scaffold_checkpoint(tmp_path / "a", "tiny", seed=4)
    b = scaffold.scaffold_checkpoint(tmp_path / "b", "tiny", seed=4)
    assert (a / "pose_head.safetensors").read_bytes() == (b / "pose_head.safetensors").read_bytes()
    weights = sorted((a / "base").glob("*.safetensors"))
    assert [w.read_bytes() for w in weights] == [
        (b / "base" / w.name).read_bytes() for w in weights
    ]
    with pytest.raises(FileExistsError, match="not an empty directory"):
        scaffold.scaffold_checkpoint(a, "tiny")


def test_demo_preset_fits_the_size_budget():
    size = SIZES["demo"]
    tokenizer = scaffold.build_tokenizer(vocab_size=size.vocab_size)
    model = scaffold.build_model(tokenizer, size)
    parameters = sum(p.numel() for p in model.parameters())
    # float32 weights of at most 50 MB, counting a full 4096-token vocabulary.
    full_vocab = parameters + 2 * (size.vocab_size - len(tokenizer)) * size.hidden_size
    assert full_vocab * 4 <= 50e6
    assert full_vocab > 3e6  # not accidentally tiny (5.0 M)


def test_cli_writes_a_checkpoint(tmp_path, capsys):
    texts = tmp_path / "captions.json"
    texts.write_text(json.dumps({"0": ["a person doing a cartwheel"]}), encoding="utf-8-sig")
    assert scaffold.read_texts([texts]) == ["a person doing a cartwheel"]  # as training reads it
    latin = tmp_path / "lines.txt"
    latin.write_bytes("a person's café pose".encode("latin-1"))
    for bad in (latin, tmp_path / "absent.json"):
        assert scaffold.main([str(tmp_path / "no"), "--size", "tiny", "--texts", str(bad)]) == 2
        assert str(bad) in capsys.readouterr().err
    from inference_service.training.corpus import generate_corpus, save_corpus

    records = generate_corpus(1, 3)
    save_corpus(records, tmp_path / "corpus.npz")
    assert scaffold.read_texts([tmp_path / "corpus.npz"]) == [r.caption for r in records]
    code = scaffold.main([str(tmp_path / "out"), "--size", "tiny", "--texts", str(texts)])
    assert code == 0
    assert "wrote" in capsys.readouterr().out
    Checkpoint.open(tmp_path / "out")
    assert scaffold.main([str(tmp_path / "out"), "--size", "tiny"]) == 2
