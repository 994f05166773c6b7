"""Figures a benchmark reads from Baton or derives from its samples."""

from __future__ import annotations

import statistics
import urllib.request
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from reparent.sandbox import HOST


def scrape_metrics(port: int, families: tuple[str, ...]) -> dict[str, list[dict[str, Any]]]:
    """The named families from Baton's endpoint, as samples with their labels."""
    with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        family.name: [
            {"name": s.name, "labels": dict(s.labels), "value": s.value} for s in family.samples
        ]
        for family in text_string_to_metric_families(text)
        if family.name in families
    }


def sample_sum(metrics: dict[str, list[dict[str, Any]]], family: str, suffix: str) -> float:
    """The family's samples named family + suffix, summed over labels (0 if there are none)."""
    return sum(s["value"] for s in metrics.get(family, []) if s["name"] == family + suffix)


def quantile(values: list[float], q: float) -> float | None:
    """Linear interpolation between the closest ranks (numpy's default); with 10 values the
    p99 lies between the two largest, so it is nearly the maximum."""
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]
