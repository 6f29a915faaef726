"""Which examples each batch takes (`MixedSampler`): the mix of kinds, from the seed.

Data order: every optimizer step takes `grad_accum` micro-batches of `batch_size` examples, whose
kinds follow the mix ratio exactly where it divides the batch (text:image:chat 1:2:1 and a batch
of 8 give 2 text, 4 image, 2 chat examples; leftover slots are drawn by the fractional parts);
each kind is walked in a shuffled order, reshuffled when used up. Everything random comes from
the seed, so a run is reproducible and `resume` replays the sampler up to the saved step.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from inference_service.training.config import TrainingError
from inference_service.training.datasets import KINDS


class MixedSampler:
    """Batches of example indices following the kind ratio; a pure function of the seed."""

    def __init__(self, kinds: Sequence[str], mix: Sequence[float], batch_size: int, seed: int):
        pools = {kind: [i for i, k in enumerate(kinds) if k == kind] for kind in KINDS}
        weights = dict(zip(KINDS, mix, strict=True))
        self.kinds = [kind for kind in KINDS if pools[kind] and weights[kind] > 0]
        if not self.kinds:
            raise TrainingError(
                "no examples to train on: the mix ratio gives weight 0 to every kind present "
                f"(examples per kind: { {k: len(v) for k, v in pools.items()} })"
            )
        total = sum(weights[k] for k in self.kinds)
        self.shares = np.array([weights[k] / total for k in self.kinds])
        self.pools = {kind: np.array(pools[kind]) for kind in self.kinds}
        self.batch_size = batch_size
        self.rng = np.random.default_rng(seed)
        self.orders = {kind: np.array([], dtype=int) for kind in self.kinds}
        self.cursors = dict.fromkeys(self.kinds, 0)

    def _counts(self) -> np.ndarray:
        exact = self.shares * self.batch_size
        counts = np.floor(exact + 1e-9).astype(int)
        left = self.batch_size - int(counts.sum())
        if left > 0:
            # Systematic sampling: `left` points one apart from a random start, over the kinds'
            # fractional parts laid end to end (they add up to `left`), so each kind gets its
            # extra slot with probability its fraction and the mix holds on average.
            ends = np.cumsum(np.clip(exact - counts, 0, None))
            points = self.rng.random() + np.arange(left)
            chosen = np.minimum(np.searchsorted(ends, points, side="right"), len(ends) - 1)
            counts[chosen] += 1
        return counts

    def _draw(self, kind: str) -> int:
        if self.cursors[kind] >= len(self.orders[kind]):
            self.orders[kind] = self.rng.permutation(self.pools[kind])
            self.cursors[kind] = 0
        index = int(self.orders[kind][self.cursors[kind]])
        self.cursors[kind] += 1
        return index

    def next_batch(self) -> list[int]:
        counts = self._counts()
        return [
            self._draw(kind) for kind, n in zip(self.kinds, counts, strict=True) for _ in range(n)
        ]


def unused_kinds(kinds: Sequence[str], mix: Sequence[float]) -> list[str]:
    present = set(kinds)
    weights = dict(zip(KINDS, mix, strict=True))
    return [kind for kind in KINDS if kind in present and weights[kind] == 0] + [
        f"{kind} (no examples)" for kind in KINDS if kind not in present and weights[kind] > 0
    ]
