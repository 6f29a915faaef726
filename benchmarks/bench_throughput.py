"""Fast-path throughput (poses per second) at batch 1 vs larger batches, on CPU or CUDA.

The same 32 pose requests (text descriptions of different lengths, as a real batch has) are
answered with `ChatPoseModel.predict_poses`, in chunks of each batch size: at batch 1 that is
32 calls of one request, at batch 32 one call of 32 (right-padded to the longest, as the
service does). Throughput = 32 / the time for all 32. The batch sizes are interleaved round by
round, so drift in the machine's speed hits them all alike.

    .venv/bin/python benchmarks/bench_throughput.py [--device cuda] [--batches 1,8,32]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import benchlib

from inference_service.modeling_chatpose import PosePrompt

# Batch 32 vs batch 1, by device type: a GPU runs a batch in parallel, a CPU mostly in turn.
TARGETS = {"cpu": 1.5, "cuda": 10.0}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    benchlib.add_common_arguments(parser, repeats=15, warmup=1)
    parser.add_argument(
        "--batches", default="1,8,32", help="comma-separated batch sizes (default 1,8,32)"
    )
    parser.add_argument("--requests", type=int, default=32, help="requests per round")
    parser.add_argument("--image", action="store_true", help="one image with every request")
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    benchlib.setup_torch(args.threads)
    size = benchlib.model_size(args)
    images = (benchlib.image_bytes(),) if args.image else ()
    descriptions = [
        benchlib.DESCRIPTIONS[i % len(benchlib.DESCRIPTIONS)] for i in range(args.requests)
    ]
    requests = [PosePrompt(text, images) for text in descriptions]

    with benchlib.temporary_directory() as workdir:
        model = benchlib.build_model(size, args.device, Path(workdir))

        def sweep(batch: int):
            def run():
                for start in range(0, len(requests), batch):
                    model.predict_poses(requests[start : start + batch])

            return run

        monitor = benchlib.LoadMonitor()
        times = benchlib.measure_interleaved(
            {b: sweep(b) for b in batches}, model.device, warmup=args.warmup, repeats=args.repeats
        )
        lengths = [benchlib.sequence_length(model, bool(images), text) for text in descriptions]
        facts = benchlib.machine_facts(model), benchlib.model_facts(model, size), monitor.facts()

    base = min(batches)
    target = TARGETS.get(model.device.type)  # none for other devices: no target cell
    rows = []
    for batch in batches:
        rate = len(requests) / benchlib.median(times[batch])
        gains = benchlib.paired_ratios(times[base], times[batch])
        gain = benchlib.median(gains)
        compared = target is not None and batch == 32 and base == 1
        met = ("yes" if gain >= target else "no") if compared else ""
        rows.append(
            [
                str(batch),
                f"{rate:.1f}",
                f"{benchlib.median(times[batch]) / len(requests) * 1000:.2f} ms",
                f"{gain:.2f}x",
                f"{benchlib.percentile(gains, 10):.2f}-{benchlib.percentile(gains, 90):.2f}",
                f">= {target:g}x" if met else "",
                met,
            ]
        )
    header = [
        "batch",
        "poses/s",
        "time per pose",
        f"vs batch {base} (median)",
        "p10-p90",
        "target",
        "met?",
    ]
    kind = "text + image" if images else "text"
    body = "\n\n".join(
        [
            benchlib.markdown_table(header, rows),
            f"{len(requests)} {kind} requests per round, {args.repeats} rounds after "
            f"{args.warmup} warm-up round(s); poses/s from the median round; the gain is the "
            "median of the per-round ratios.",
            f"Sequence lengths (prompt + answer, tokens): {min(lengths)} to {max(lengths)}, "
            f"mean {sum(lengths) / len(lengths):.0f}; a batch is padded to its longest.",
            benchlib.facts_list(*facts),
        ]
    )
    benchlib.report(
        benchlib.block_name("bench_throughput", model.device, args), body, args.write_doc
    )


if __name__ == "__main__":
    main()
