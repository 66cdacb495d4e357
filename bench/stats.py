"""Small statistics helpers: percentiles, medians, Prometheus histogram quantiles."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def median(values: Sequence[float | None]) -> float | None:
    real = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(real) if real else None


def parse_prometheus(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """name -> [(labels, value)] for every sample line of a text exposition."""
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        labels: dict[str, str] = {}
        name = head
        if "{" in head:
            name, _, rest = head.partition("{")
            for part in rest.rstrip("}").split('",'):
                if "=" in part:
                    k, _, v = part.partition("=")
                    labels[k.strip()] = v.strip().strip('"')
        try:
            out.setdefault(name, []).append((labels, float(value)))
        except ValueError:
            continue
    return out


def histogram(
    metrics: dict[str, list[tuple[dict[str, str], float]]], name: str
) -> tuple[list[tuple[float, float]], float, float]:
    """Cumulative buckets [(upper bound, count)], total count and sum of a label-less histogram."""
    buckets = sorted(
        ((math.inf if labels["le"] == "+Inf" else float(labels["le"])), value)
        for labels, value in metrics.get(f"{name}_bucket", [])
    )
    count = sum(v for _, v in metrics.get(f"{name}_count", []))
    total = sum(v for _, v in metrics.get(f"{name}_sum", []))
    return buckets, count, total


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Prometheus' histogram_quantile: linear interpolation inside the bucket holding the rank."""
    if not buckets or buckets[-1][1] == 0:
        return None
    total = buckets[-1][1]
    rank = q * total
    prev_bound, prev_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return prev_bound  # above the last finite bucket: its bound is all we know
            if count == prev_count:
                return bound
            return prev_bound + (bound - prev_bound) * (rank - prev_count) / (count - prev_count)
        prev_bound, prev_count = bound, count
    return prev_bound


def share_above(threshold: float, buckets: list[tuple[float, float]]) -> float | None:
    """Share of observations above `threshold` (exact when threshold is a bucket bound)."""
    if not buckets or buckets[-1][1] == 0:
        return None
    total = buckets[-1][1]
    below = max((c for b, c in buckets if b <= threshold), default=0.0)
    return (total - below) / total
