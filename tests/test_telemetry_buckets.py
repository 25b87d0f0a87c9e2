"""The histogram buckets: percentiles read back from them, the way Prometheus' histogram_quantile()
reads them, stay within 10% of the truth for the durations a pool measures. (The Prometheus test,
test_telemetry_prometheus.py, checks the same on a real Prometheus.)"""

from __future__ import annotations

import bisect
import itertools
import math
import random
import statistics

import pytest

from asyncpool.telemetry import semconv as sc


def histogram_quantile(q: float, bounds: tuple[float, ...], values: list[float]) -> float:
    """Prometheus' algorithm (promql/quantile.go, bucketQuantile) over cumulative bucket counts:
    find the bucket holding rank q*count and interpolate linearly inside it, from 0 for the first
    bucket; a rank in the +Inf bucket gives the highest finite bound."""
    counts = [0] * (len(bounds) + 1)
    for v in values:
        counts[bisect.bisect_left(bounds, v)] += 1  # le: a value equal to a bound counts in it
    cumulative = []
    total = 0
    for c in counts:
        total += c
        cumulative.append(total)
    rank = q * total
    b = bisect.bisect_left(cumulative, rank)
    if b == len(bounds):
        return bounds[-1]
    lower = 0.0 if b == 0 else bounds[b - 1]
    below = 0 if b == 0 else cumulative[b - 1]
    return lower + (bounds[b] - lower) * (rank - below) / (cumulative[b] - below)


def test_buckets_are_geometric_from_61_microseconds_to_64_seconds() -> None:
    bounds = sc.TIME_BUCKETS
    assert len(bounds) == 81
    assert bounds[0] == pytest.approx(2**-14)
    assert bounds[-1] == 64.0
    ratios = {round(b / a, 9) for a, b in itertools.pairwise(bounds)}
    assert ratios == {round(2**0.25, 9)}


def test_the_issue_case_holds_of_half_a_second() -> None:
    """19 holds with a mean of 0.501 s gave p50 0.75 s with the old (0.5, 1.0] bucket."""
    rng = random.Random(19)
    holds = [0.5 + rng.uniform(0.0005, 0.0015) for _ in range(19)]
    truth = statistics.median(holds)
    assert histogram_quantile(0.5, sc.TIME_BUCKETS, holds) == pytest.approx(truth, rel=0.10)
    old = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
           1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
    assert histogram_quantile(0.5, old, holds) == pytest.approx(0.75, rel=0.01)  # the bug


@pytest.mark.parametrize("point", [2.5e-4, 0.001, 0.0123, 0.1, 0.5 + 1e-6, 0.999, 1.0, 2.0, 29.9])
def test_a_single_duration_reads_back_within_one_bucket(point: float) -> None:
    """The worst case: every sample the same (a fixed sleep), just above or at a bound. The median
    reads back mid-bucket, within 10%; a tail percentile near the bucket's top, within its width."""
    assert histogram_quantile(0.5, sc.TIME_BUCKETS, [point] * 50) == pytest.approx(point, rel=0.10)
    for q in (0.95, 0.99):
        assert histogram_quantile(q, sc.TIME_BUCKETS, [point] * 50) == pytest.approx(point, rel=0.19)


@pytest.mark.parametrize(
    ("name", "draw"),
    [
        ("checkout waits, lognormal around 80 µs", lambda r: r.lognormvariate(math.log(8e-5), 0.5)),
        ("logins, uniform 2-9 ms", lambda r: r.uniform(0.002, 0.009)),
        ("queries, lognormal around 3 ms", lambda r: r.lognormvariate(math.log(0.003), 1.0)),
        ("Lambda holds, uniform 40-900 ms", lambda r: r.uniform(0.04, 0.9)),
        ("long holds, exponential mean 4 s", lambda r: r.expovariate(0.25)),
    ],
)
def test_percentiles_of_known_distributions(name: str, draw: object) -> None:
    rng = random.Random(name)
    values = sorted(draw(rng) for _ in range(5000))  # type: ignore[operator]
    for q in (0.5, 0.9, 0.99):
        truth = values[int(q * len(values)) - 1]
        assert histogram_quantile(q, sc.TIME_BUCKETS, values) == pytest.approx(truth, rel=0.10), q


def test_legacy_conventions_use_the_same_buckets_in_milliseconds() -> None:
    assert sc.LEGACY.buckets == pytest.approx(tuple(b * 1000 for b in sc.TIME_BUCKETS))
    assert sc.CURRENT.buckets == sc.TIME_BUCKETS
