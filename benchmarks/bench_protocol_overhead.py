"""Protocol overhead: a pose request's loopback round trip through the real service stack,
minus the model's own time for the same request.

The stack is what `chatpose-serve` runs: `Server` (ROUTER socket, I/O thread) + `Scheduler`
(worker thread) + `ModelBackend` over a `ChatPoseModel`, bound to tcp://127.0.0.1 on a free
port and served from a thread of this process; the client is `shared_protocol.client.Client`
(DEALER), one request at a time, with `max_wait_ms=0` so no batching delay is added.

Per request i, with the backend wrapped by a stopwatch that adds two perf_counter calls:

    overhead_i = round trip_i - the time answer_poses([item]) took inside the server for it

As a cross-check, `backend.answer_poses([item])` is also timed directly (no server involved)
before each round trip, and median(round trip) - median(direct) is reported too.

    .venv/bin/python benchmarks/bench_protocol_overhead.py [--requests 200] [--image]
"""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path

import benchlib
import torch
import zmq

from inference_service.backend import ModelBackend
from inference_service.scheduler import WorkItem
from inference_service.server import Server
from shared_protocol.client import Client
from shared_protocol.protocol import (
    DEFAULT_LIMITS,
    PoseReply,
    PoseRequest,
    StatusReply,
    StatusRequest,
    decode_reply,
    encode_reply,
)

TARGET_MS = 2.0
TIMEOUT_S = 60.0


class StopwatchBackend:
    """The real backend, with the duration of each answer_poses call recorded."""

    def __init__(self, backend: ModelBackend):
        self.backend = backend
        self.info = backend.info
        self.durations: list[float] = []

    def answer_poses(self, items):
        start = time.perf_counter()
        answers = self.backend.answer_poses(items)
        self.durations.append(time.perf_counter() - start)
        return answers

    def answer_chat(self, item, stop=None):
        return self.backend.answer_chat(item, stop)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    benchlib.add_common_arguments(parser, repeats=200, warmup=20)
    parser.add_argument("--image", action="store_true", help="send an image with the request")
    args = parser.parse_args(argv)
    benchlib.setup_torch(args.threads)
    size = benchlib.model_size(args)
    images = (benchlib.image_bytes(),) if args.image else ()
    item = WorkItem(benchlib.DESCRIPTION, images)

    with benchlib.temporary_directory() as workdir:
        model = benchlib.build_model(size, args.device, Path(workdir))
        backend = ModelBackend(model, "bench")
        stopwatch = StopwatchBackend(backend)
        server = Server(stopwatch, backend.info, "tcp://127.0.0.1:*", max_wait_ms=0)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        context = zmq.Context()
        client = Client(server.address, context=context)
        monitor = benchlib.LoadMonitor()
        direct: list[float] = []
        round_trips: list[float] = []
        in_server: list[float] = []
        status_trips: list[float] = []
        try:
            for index in range(args.warmup + args.repeats):
                with torch.inference_mode():
                    start = time.perf_counter()
                    backend.answer_poses([item])
                    direct_s = time.perf_counter() - start
                request = PoseRequest(client.new_id(), benchlib.DESCRIPTION, images)
                start = time.perf_counter()
                reply = client.request(request, TIMEOUT_S)
                trip_s = time.perf_counter() - start
                if not isinstance(reply, PoseReply):
                    raise SystemExit(f"unexpected reply: {reply}")
                start = time.perf_counter()
                status = client.request(StatusRequest(client.new_id()), TIMEOUT_S)
                status_s = time.perf_counter() - start
                if not isinstance(status, StatusReply):
                    raise SystemExit(f"unexpected reply: {status}")
                if index >= args.warmup:
                    direct.append(direct_s)
                    round_trips.append(trip_s)
                    in_server.append(stopwatch.durations[-1])
                    status_trips.append(status_s)
        finally:
            client.close()
            server.stop()
            thread.join(30)
            context.term()
        facts = benchlib.machine_facts(model), benchlib.model_facts(model, size), monitor.facts()
        length = benchlib.sequence_length(model, bool(images))

    # Every reply is encoded (and, as a self-check, decoded again) by encode_reply on the
    # thread that emits it: for pose replies, the scheduler's worker thread.
    answer = backend.answer_poses([item])[0]
    reply = PoseReply("bench-1", answer.text, answer.poses)
    frames = encode_reply(reply)
    cpu = torch.device("cpu")
    encode_times = benchlib.measure(lambda: encode_reply(reply), cpu, warmup=5, repeats=200)
    decode_times = benchlib.measure(
        lambda: decode_reply(frames, DEFAULT_LIMITS), cpu, warmup=5, repeats=200
    )

    overheads = [trip - model_s for trip, model_s in zip(round_trips, in_server, strict=True)]
    median_overhead = benchlib.median(overheads)

    def stats(values: list[float]) -> list[str]:
        return [benchlib.ms(benchlib.median(values)), benchlib.ms(benchlib.percentile(values, 90))]

    rows = [
        ["round trip (pose request)", *stats(round_trips)],
        ["model time inside the server, same request", *stats(in_server)],
        ["**overhead** = round trip - model time, per request", *stats(overheads)],
        ["model time, answer_poses([item]) called directly", *stats(direct)],
        [
            "cross-check: median(round trip) - median(direct)",
            benchlib.ms(benchlib.median(round_trips) - benchlib.median(direct)),
            "",
        ],
        ["status round trip (no model, for scale)", *stats(status_trips)],
        ["encode_reply(one PoseReply), incl. its self-check decode", *stats(encode_times)],
        ["decode_reply(one PoseReply), the client's share", *stats(decode_times)],
    ]
    verdict = "met" if median_overhead * 1000 <= TARGET_MS else "NOT met"
    kind = "text + image" if images else "text"
    body = "\n\n".join(
        [
            benchlib.markdown_table(["quantity", "median", "p90"], rows),
            f"Target: median overhead <= {TARGET_MS:g} ms: {verdict}. {args.repeats} {kind} "
            f"pose requests after {args.warmup} warm-up requests, one at a time, "
            "max_wait_ms=0, max_batch 8; server, scheduler, client and model in one process "
            f"(threads). Fast-path input: {length} tokens.",
            benchlib.facts_list(*facts),
        ]
    )
    benchlib.report("bench_protocol_overhead", body, args.write_doc)


if __name__ == "__main__":
    main()
