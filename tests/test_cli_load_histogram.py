"""The load engine's latency histogram: bucket arithmetic, percentile accuracy, exact merging."""

from __future__ import annotations

import math
import pickle
import random

import pytest

from asyncpool.load.histogram import BUCKETS, LatencyHistogram, bucket_of, bucket_range

# Above the linear range a bucket spans 1/64 of its lower bound or less.
RELATIVE_ERROR = 1 / 64


def _exact_percentile(samples: list[int], fraction: float) -> int:
    ordered = sorted(samples)
    return ordered[max(1, math.ceil(fraction * len(ordered))) - 1]


def test_every_value_falls_inside_its_bucket_and_buckets_tile_the_axis() -> None:
    for value in [*range(0, 5000), *(2**k + d for k in range(12, 38) for d in (-1, 0, 1))]:
        low, high = bucket_range(bucket_of(value))
        assert low <= value < high, value
    for index in range(BUCKETS - 1):
        assert bucket_range(index)[1] == bucket_range(index + 1)[0], index


def test_bucket_width_is_within_the_stated_relative_error() -> None:
    for index in range(128, BUCKETS):
        low, high = bucket_range(index)
        assert (high - low) / low <= RELATIVE_ERROR


def test_percentiles_match_exact_nearest_rank_within_the_bucket_error() -> None:
    rng = random.Random(7)
    # Log-uniform from 50 µs to 2 s: the spread a run through a saturated pooler shows.
    samples = [int(math.exp(rng.uniform(math.log(50), math.log(2_000_000)))) for _ in range(20_000)]
    hist = LatencyHistogram()
    for micros in samples:
        hist.record(micros / 1_000_000)
    for fraction in (0.01, 0.5, 0.95, 0.99, 0.999, 1.0):
        exact = _exact_percentile(samples, fraction)
        got = hist.percentile(fraction) * 1_000_000
        assert abs(got - exact) <= exact * RELATIVE_ERROR + 1, (fraction, got, exact)
    assert hist.count == len(samples)
    assert hist.min_us == min(samples)
    assert hist.max_us == max(samples)
    assert hist.mean * 1_000_000 == pytest.approx(sum(samples) / len(samples))


def test_merging_per_process_histograms_equals_one_histogram_of_all_samples() -> None:
    rng = random.Random(3)
    parts = [[rng.randint(1, 400_000) for _ in range(1000 + 300 * n)] for n in range(4)]
    whole = LatencyHistogram()
    pieces = []
    for part in parts:
        piece = LatencyHistogram()
        for micros in part:
            piece.record(micros / 1e6)
            whole.record(micros / 1e6)
        # Workers ship their histogram to the parent through a multiprocessing queue.
        pieces.append(pickle.loads(pickle.dumps(piece)))  # noqa: S301 - our own bytes
    merged = LatencyHistogram.merged(pieces)
    assert merged.counts == whole.counts
    assert (merged.count, merged.total_us, merged.min_us, merged.max_us) == (
        whole.count, whole.total_us, whole.min_us, whole.max_us
    )


def test_merging_into_an_empty_histogram_takes_the_other_minimum() -> None:
    filled = LatencyHistogram()
    filled.record(0.250)
    empty = LatencyHistogram()
    empty.merge(filled)
    assert empty.min_us == 250_000
    empty.merge(LatencyHistogram())
    assert empty.count == 1


def test_an_empty_histogram_reports_zero_and_fractions_are_checked() -> None:
    hist = LatencyHistogram()
    assert hist.percentile(0.99) == 0.0
    assert hist.mean == 0.0
    for bad in (0, -0.5, 1.5):
        with pytest.raises(ValueError, match="fraction"):
            hist.percentile(bad)


def test_values_beyond_the_top_bucket_are_kept_in_it() -> None:
    hist = LatencyHistogram()
    hist.record(10**9)  # about 32 years
    assert hist.counts[BUCKETS - 1] == 1
    assert hist.percentile(1.0) == 10**9
