"""The batch requests that `chatpose batch` and the add-on's Batch Keyframe both send."""

from __future__ import annotations

import pytest

from shared_protocol.batch_requests import BUSY_RETRY_DELAYS_S, BatchRequests, batch_chunks
from shared_protocol.protocol import DEFAULT_LIMITS, BatchRequest, encode_request


def _sent(plan: BatchRequests) -> list[range]:
    requests = []
    while (request := plan.next()) is not None:
        requests.append(request)
    return requests


def test_each_request_holds_the_protocol_limit_of_prompts_in_order():
    plan = BatchRequests([f"prompt {i}" for i in range(600)])
    assert plan.planned == 3 and plan.current == range(0) and plan.more
    assert _sent(plan) == [range(0, 256), range(256, 512), range(512, 600)]
    assert plan.sent == 3 and not plan.more and plan.current == range(512, 600)
    assert _sent(BatchRequests([])) == [] and BatchRequests([]).planned == 0
    with pytest.raises(ValueError):
        BatchRequests(["wave"], 0)


def test_long_prompts_fill_a_request_by_the_header_size_before_256_do():
    requests = _sent(BatchRequests([f"{i} " + "x" * 7000 for i in range(200)]))
    assert len(requests) > 1 and max(len(r) for r in requests) < 200
    assert [p for r in requests for p in r] == list(range(200))


def test_a_request_refused_as_more_than_the_queue_holds_goes_again_in_halves():
    plan = BatchRequests([f"prompt {i}" for i in range(300)])
    plan.next()
    assert plan.in_smaller_requests()  # 256 refused: it and the rest in requests of 128
    assert plan.next() == range(0, 128) and plan.in_smaller_requests()  # 64 now
    assert _sent(plan) == [range(0, 64), range(64, 128), range(128, 192), range(192, 256),
                           range(256, 300)]  # fmt: skip
    assert plan.size == 64
    odd = BatchRequests([f"prompt {i}" for i in range(5)])
    odd.next()
    assert odd.in_smaller_requests() and odd.next() == range(0, 2)  # half of 5, rounded down
    single = BatchRequests(["wave"])
    assert not single.in_smaller_requests()  # nothing sent yet
    single.next()
    assert not single.in_smaller_requests()  # one prompt: no smaller request would do
    assert single.next() is None


def test_a_request_refused_as_busy_goes_again_after_each_delay_in_turn():
    plan = BatchRequests([f"prompt {i}" for i in range(300)])
    assert plan.delay_before_again() is None  # nothing sent yet
    plan.next()
    assert plan.delay_before_again() == BUSY_RETRY_DELAYS_S[0]
    assert plan.next() == range(0, 256)  # the same request again
    assert plan.delay_before_again() == BUSY_RETRY_DELAYS_S[1]
    plan.next()
    plan.taken()  # answered: a later busy starts the delays over
    assert plan.next() == range(256, 300)
    delays = []
    while (delay := plan.delay_before_again()) is not None:
        delays.append(delay)
        assert plan.next() == range(256, 300)
    assert tuple(delays) == BUSY_RETRY_DELAYS_S and plan.sent == 4 + len(delays)


# --- splitting a long list of prompts into batch requests ---------------------------------------


def test_batch_chunks_cap_items_and_header_bytes_and_every_chunk_encodes():
    assert batch_chunks([]) == []
    assert batch_chunks(["a"] * 600) == [range(0, 256), range(256, 512), range(512, 600)]
    assert batch_chunks(["a"] * 5, max_items=2) == [range(0, 2), range(2, 4), range(4, 5)]
    # 200 prompts of 7,000 characters each: far over 1 MiB in one request, so by bytes.
    accented = [f"{i} " + "é" * 7000 for i in range(200)]
    chunks = batch_chunks(accented)
    assert [i for chunk in chunks for i in chunk] == list(range(200))
    assert len(chunks) > 1 and all(len(chunk) < 256 for chunk in chunks)
    # 300 prompts of 4,093 characters: 256 of them all but fill a header, leaving the header's
    # other fields no room, so a chunk of 255 is what encodes.
    filling = [f"{i:03d}" + "x" * 4090 for i in range(300)]
    assert [len(chunk) for chunk in batch_chunks(filling)] == [255, 45]
    for prompts in (accented, filling):
        for chunk in batch_chunks(prompts):
            request = BatchRequest("b", [prompts[i] for i in chunk])
            assert len(encode_request(request)[0]) <= DEFAULT_LIMITS.max_header_bytes
    with pytest.raises(ValueError, match="max_items: expected 1 to 256, got 0"):
        batch_chunks(["a"], max_items=0)
