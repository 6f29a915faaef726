"""The batch requests that send a list of prompts, in order: what `chatpose batch` and the
add-on's *Batch Keyframe* both send, and what each does when the service refuses one whole.

Prompts go in consecutive requests of at most ``size`` (the protocol's ``max_batch_items``,
within its header size: ``batch_chunks``), one after the other. A request the service refuses
whole is sent again:
- as more than its queue holds (``too_large``; chatpose-serve --max-queue): it and the rest in
  requests half its size (``in_smaller_requests``);
- as ``busy`` (other clients' work fills the queue, or the model is loading): the same request,
  after ``BUSY_RETRY_DELAYS_S`` (``delay_before_again``), until they are all waited.

The caller keeps the prompts' meaning (lines, frames); a request is a ``range`` of positions in
``prompts``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from .protocol import DEFAULT_LIMITS, Limits

MAX_BATCH_ITEMS = DEFAULT_LIMITS.max_batch_items

# How long a batch run waits before sending a request again that the service refused whole as
# `busy` (its queue full with other clients' work, or its model loading): a delay a try, then
# it gives up, after 90 s in all.
BUSY_RETRY_DELAYS_S = (1.0, 2.0, 4.0, 8.0, 15.0, 15.0, 15.0, 15.0, 15.0)


def batch_chunks(
    prompts: Sequence[str], max_items: int | None = None, limits: Limits = DEFAULT_LIMITS
) -> list[range]:
    """Consecutive ranges of `prompts`, in order, each small enough for one batch request: at
    most `max_items` (default: the limit's) prompts, and a header within `max_header_bytes`
    (long prompts fill it before 256 do)."""
    max_items = limits.max_batch_items if max_items is None else max_items
    if not 1 <= max_items <= limits.max_batch_items:
        raise ValueError(f"max_items: expected 1 to {limits.max_batch_items}, got {max_items}")
    budget = limits.max_header_bytes - 1024  # the header's other fields
    chunks, start, size = [], 0, 0
    for index, prompt in enumerate(prompts):
        cost = len(json.dumps(prompt, ensure_ascii=False).encode("utf-8", "surrogatepass")) + 1
        if index > start and (index - start == max_items or size + cost > budget):
            chunks.append(range(start, index))
            start, size = index, 0
        size += cost
    if start < len(prompts):
        chunks.append(range(start, len(prompts)))
    return chunks


class BatchRequests:
    def __init__(self, prompts: Sequence[str], size: int = MAX_BATCH_ITEMS) -> None:
        self.prompts = list(prompts)
        self.size = size
        self.sent = 0  # requests sent, again-sent ones included
        self._requests = batch_chunks(self.prompts, size)  # ValueError for a size out of range
        self._at = -1  # the request in flight, or the last one sent
        self._busy_tries = 0  # in a row

    @property
    def planned(self) -> int:
        """How many requests the prompts take as planned now."""
        return len(self._requests)

    @property
    def current(self) -> range:
        """The positions of the request sent last (empty before the first)."""
        return self._requests[self._at] if self._at >= 0 else range(0)

    @property
    def more(self) -> bool:
        """Whether a request is still to be sent after the current one."""
        return self._at + 1 < len(self._requests)

    def next(self) -> range | None:
        """The next request's positions, now sent; None when every request has been."""
        if not self.more:
            return None
        self._at += 1
        self.sent += 1
        return self.current

    def taken(self) -> None:
        """The service took the current request (it answered it): a later ``busy`` starts the
        delays over."""
        self._busy_tries = 0

    def in_smaller_requests(self) -> bool:
        """The service refused the current request whole as more than its queue holds: it and
        the rest are planned again in requests half its size, the next of them from ``next``.
        False when it held one prompt (no smaller request would do)."""
        current = self.current
        if len(current) < 2:
            return False
        self.size = len(current) // 2
        rest = batch_chunks(self.prompts[current.start :], self.size)
        start = current.start
        self._requests[self._at :] = [range(start + r.start, start + r.stop) for r in rest]
        self._at -= 1
        return True

    def delay_before_again(self) -> float | None:
        """The service refused the current request whole as busy: the seconds to wait before
        ``next`` gives it again; None once every delay has been waited."""
        if self._at < 0 or self._busy_tries >= len(BUSY_RETRY_DELAYS_S):
            return None
        delay = BUSY_RETRY_DELAYS_S[self._busy_tries]
        self._busy_tries += 1
        self._at -= 1
        return delay
