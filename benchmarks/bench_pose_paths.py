"""Pose fast path vs generation: the chat path (KV cache) and the official release's way.

For one pose request (a text description, and a description plus an image) it times, on the
same model and the same prompt:

- fast: `ChatPoseModel.predict_poses` (the answer template appended, one forward pass);
- chat: `ChatPoseModel.chat` (`generate` with the KV cache), forced by a logits processor to
  write exactly the fast path's answer ("Sure, it is <POSE>." then end-of-sequence);
- release: what the official release did: `generate` WITHOUT the KV cache (every step
  re-processes the prompt and the image), greedy, max_new_tokens=512, forced to the same
  answer, then one forward pass over prompt + answer to read the hidden state before the pose
  token. Two variants: stopping as soon as the pose token is written ("to pose", the cheapest
  possible) and running to end-of-sequence as the release did ("to EOS").

Every path's pose is checked against the fast path's, so all of them compute the same thing.

    .venv/bin/python benchmarks/bench_pose_paths.py [--size demo] [--repeats 20] [--write-doc]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import benchlib
import numpy as np
import torch
from transformers import LogitsProcessorList

from inference_service.images import decode_image
from inference_service.modeling_chatpose import ChatPoseModel, PosePrompt
from inference_service.pose_head import decode_pose
from inference_service.prompts import build_prompt, image_prefix, pose_exchange
from shared_protocol.rotations import axis_angle_to_matrix, geodesic_distance

RELEASE_MAX_NEW_TOKENS = 512
CHAT_TARGET = 4.0
RELEASE_TARGET = 10.0


def release_way(
    model: ChatPoseModel, question: str, images: tuple[bytes, ...], forced: list[int], *, to_eos
) -> np.ndarray:
    """The release's inference: cache-less generation, then a forward for the hidden state."""
    decoded = [decode_image(data) for data in images]
    markers = image_prefix(len(decoded), model.image_token, model.config.mm_use_im_start_end)
    prompt = build_prompt(
        model.template, question, image_markers=markers, pose_token=model.config.pose_token
    )
    encoded = model.processor(text=[prompt], images=decoded or None, return_tensors="pt")
    inputs = {name: value.to(model.device) for name, value in encoded.items()}
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    eos = model.tokenizer.eos_token_id
    stop = [eos] if to_eos else [eos, model.pose_token_id]
    sequences = model.model.generate(
        **inputs,
        max_new_tokens=RELEASE_MAX_NEW_TOKENS,
        do_sample=False,
        use_cache=False,
        logits_processor=LogitsProcessorList([benchlib.forcing.ForceTokens(forced)]),
        eos_token_id=stop,
        pad_token_id=model.tokenizer.pad_token_id,
    )
    backbone = model.model.base_model
    hidden = backbone(
        input_ids=sequences,
        attention_mask=torch.ones_like(sequences),
        pixel_values=inputs.get("pixel_values"),
    ).last_hidden_state
    position = int((sequences[0] == model.pose_token_id).nonzero()[-1])
    state = hidden[0, position - 1].to(torch.float32)
    return decode_pose(model.head(state[None]).cpu().numpy())[0]


def largest_joint_angle(pose_a: np.ndarray, pose_b: np.ndarray) -> float:
    """The largest geodesic angle (degrees) between two (24, 3) axis-angle poses' joints."""
    matrices = [axis_angle_to_matrix(pose) for pose in (pose_a, pose_b)]
    return float(np.degrees(geodesic_distance(*matrices).max()))


def run_case(model: ChatPoseModel, args, images: tuple[bytes, ...]) -> dict:
    pose_token = model.config.pose_token
    question, answer = pose_exchange(benchlib.DESCRIPTION, bool(images), pose_token)
    forced = benchlib.forcing.answer_ids(model, question, answer, len(images))
    request = PosePrompt(benchlib.DESCRIPTION, images)

    def fast():
        return model.predict_poses([request])[0]

    def chat():
        processor = benchlib.forcing.ForceTokens(forced)
        reply = model.chat(
            question, images, logits_processor=[processor], max_new_tokens=len(forced) + 5
        )
        assert reply.text == answer.replace(pose_token, "<POSE>"), reply.text
        return reply.poses[0]

    def release_to_pose():
        return release_way(model, question, images, forced, to_eos=False)

    def release_to_eos():
        return release_way(model, question, images, forced, to_eos=True)

    paths: dict[str, Callable[[], np.ndarray]] = {
        "fast": fast,
        "chat": chat,
        "release to pose": release_to_pose,
        "release to EOS": release_to_eos,
    }
    # The paths must give the same pose. bfloat16 rounds the incremental (cached) states
    # differently from one full pass, by a few degrees on a random head; a wrong token or
    # position gives an unrelated pose, tens of degrees off.
    tolerance = 0.1 if model.dtype == torch.float32 else 10.0
    with torch.inference_mode():
        reference = fast()
        for name, path in list(paths.items())[1:]:
            difference = largest_joint_angle(path(), reference)
            print(f"{name}: at most {difference:.3f} deg from the fast path's pose")
            if difference > tolerance:
                raise SystemExit(f"{name}: a joint is {difference:.2f} deg from the fast path's")
    times = benchlib.measure_interleaved(
        paths, model.device, warmup=args.warmup, repeats=args.repeats
    )
    tokens = model.tokenizer.convert_ids_to_tokens(forced)
    return {
        "kind": "text + image" if images else "text",
        "times": times,
        "answer_tokens": len(forced),
        "tokens_to_pose": tokens.index(pose_token) + 1,
        "prompt_tokens": benchlib.sequence_length(model, bool(images)) - len(forced) + 1,
        "fast_tokens": benchlib.sequence_length(model, bool(images)),
        "cached_tokens": model.cached_prefix_length,
        # the pose token and what follows it, but for the end of sequence (not in the input)
        "skipped_tokens": len(forced) - tokens.index(pose_token) - 1,
        "token_list": tokens,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    benchlib.add_common_arguments(parser, repeats=20, warmup=3)
    parser.add_argument(
        "--cases", choices=["text", "image", "both"], default="both", help="request kinds"
    )
    args = parser.parse_args(argv)
    benchlib.setup_torch(args.threads)
    size = benchlib.model_size(args)
    with benchlib.temporary_directory() as workdir:
        model = benchlib.build_model(size, args.device, Path(workdir))
        monitor = benchlib.LoadMonitor()
        with_image = {"text": [False], "image": [True], "both": [False, True]}[args.cases]
        results = [
            run_case(model, args, (benchlib.image_bytes(),) if image else ())
            for image in with_image
        ]
        facts = benchlib.machine_facts(model), benchlib.model_facts(model, size), monitor.facts()

    rows = []
    for result in results:
        times = result["times"]
        fast = times["fast"]
        for name, target in [
            ("chat", CHAT_TARGET),
            ("release to pose", RELEASE_TARGET),
            ("release to EOS", RELEASE_TARGET),
        ]:
            ratios = benchlib.paired_ratios(times[name], fast)
            ratio = benchlib.median(ratios)
            spread = f"{benchlib.percentile(ratios, 10):.2f}-{benchlib.percentile(ratios, 90):.2f}"
            rows.append(
                [
                    result["kind"],
                    f"fast vs {name}",
                    benchlib.ms(benchlib.median(fast)),
                    benchlib.ms(benchlib.median(times[name])),
                    f"{ratio:.2f}x",
                    spread,
                    f">= {target:g}x",
                    "yes" if ratio >= target else "no",
                ]
            )
    header = [
        "request",
        "comparison",
        "fast (median)",
        "other (median)",
        "speed-up (median)",
        "speed-up p10-p90",
        "target",
        "met?",
    ]
    lengths = "\n".join(
        f"- {r['kind']}: prompt {r['prompt_tokens']} tokens, fast path input "
        f"{r['fast_tokens']} tokens, of which the pass reads "
        f"{r['fast_tokens'] - r['cached_tokens'] - r['skipped_tokens']}: the first "
        f"{r['cached_tokens']} (the system prompt and `USER:`) come from states computed once, "
        f"and it stops before the pose token; forced answer {r['answer_tokens']} tokens "
        f"({' '.join(r['token_list'])}), the pose token is generated token "
        f"{r['tokens_to_pose']}"
        for r in results
    )
    body = "\n\n".join(
        [
            benchlib.markdown_table(header, rows),
            f"{args.repeats} rounds after {args.warmup} warm-up rounds; each round runs every "
            "path once (order rotated), and the speed-up is the median of the per-round "
            "ratios. torch.inference_mode throughout.",
            "Sequence lengths (tokens the LM reads):\n" + lengths,
            benchlib.facts_list(*facts),
        ]
    )
    benchlib.report(
        benchlib.block_name("bench_pose_paths", model.device, args), body, args.write_doc
    )


if __name__ == "__main__":
    main()
