"""Figures shared by the benchmark scripts: percentiles and one printed line per figure."""

from __future__ import annotations

import statistics


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) by nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def show(name: str, values: list[float], unit: str) -> None:
    """Print `name: p50 p95 unit (n)`."""
    print(f"{name:<52} p50 {statistics.median(values):>9.2f}  p95 {percentile(values, 95):>9.2f}  "
          f"{unit}  (n={len(values)})", flush=True)
