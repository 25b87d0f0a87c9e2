"""A latency histogram with fixed log-linear buckets: cheap to record, exact to merge.

Values are whole microseconds. Below 128 µs every value has its own bucket; above, each power of
two is split into 64 buckets, so a reported percentile is within 1/64 (1.6 %) of the true value,
as in HdrHistogram with two significant digits. Worker processes each fill one and the parent
adds them up, which sorted sample lists could not do without shipping every sample.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

_SUB_BITS = 7
_LINEAR = 1 << _SUB_BITS  # values below this get one bucket each
_HALF = _LINEAR >> 1  # buckets per power of two above it
_MAX_SHIFT = 32  # the top bucket starts near 2**38 µs (three days); larger values land in it
BUCKETS = _LINEAR + _MAX_SHIFT * _HALF


def bucket_of(micros: int) -> int:
    """The bucket index of a value in microseconds."""
    if micros < _LINEAR:
        return max(micros, 0)
    shift = micros.bit_length() - _SUB_BITS
    if shift > _MAX_SHIFT:
        return BUCKETS - 1
    return _LINEAR + (shift - 1) * _HALF + (micros >> shift) - _HALF


def bucket_range(index: int) -> tuple[int, int]:
    """The values ``[low, high)`` (microseconds) that fall in bucket `index`."""
    if index < _LINEAR:
        return index, index + 1
    step, offset = divmod(index - _LINEAR, _HALF)
    shift = step + 1
    mantissa = offset + _HALF
    return mantissa << shift, (mantissa + 1) << shift


class LatencyHistogram:
    """Counts of latencies per bucket, with the exact count, sum, min and max alongside."""

    __slots__ = ("count", "counts", "max_us", "min_us", "total_us")

    def __init__(self) -> None:
        self.counts: list[int] = [0] * BUCKETS
        self.count: int = 0
        self.total_us: int = 0
        self.min_us: int = 0
        self.max_us: int = 0

    def record(self, seconds: float) -> None:
        micros = int(seconds * 1_000_000)
        self.counts[bucket_of(micros)] += 1
        if self.count == 0 or micros < self.min_us:
            self.min_us = micros
        if micros > self.max_us:  # noqa: PLR1730 - cheaper than max() per sample
            self.max_us = micros
        self.count += 1
        self.total_us += micros

    def merge(self, other: LatencyHistogram) -> None:
        """Add `other`'s samples to this histogram."""
        if other.count == 0:
            return
        self.counts = [a + b for a, b in zip(self.counts, other.counts, strict=True)]
        self.min_us = other.min_us if self.count == 0 else min(self.min_us, other.min_us)
        self.max_us = max(self.max_us, other.max_us)
        self.count += other.count
        self.total_us += other.total_us

    @classmethod
    def merged(cls, parts: Iterable[LatencyHistogram]) -> LatencyHistogram:
        whole = cls()
        for part in parts:
            whole.merge(part)
        return whole

    def percentile(self, fraction: float) -> float:
        """The latency (seconds) at or below which `fraction` (0-1] of the samples fall."""
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction={fraction!r}: must be in (0, 1]")
        if self.count == 0:
            return 0.0
        # The smallest sample count covering `fraction` (nearest-rank method).
        rank = max(1, math.ceil(fraction * self.count - 1e-9))
        seen = 0
        for index, n in enumerate(self.counts):
            seen += n
            if seen >= rank:
                low, high = bucket_range(index)
                # The middle of the bucket, never outside what was actually observed.
                middle = (low + high - 1) / 2
                return min(max(middle, self.min_us), self.max_us) / 1_000_000
        return self.max_us / 1_000_000

    @property
    def mean(self) -> float:
        """Mean latency in seconds (exact, not bucketed)."""
        return self.total_us / self.count / 1_000_000 if self.count else 0.0
