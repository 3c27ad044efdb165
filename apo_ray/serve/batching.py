"""Bookkeeping of cross-request batching: @serve.batch hands the scorer several requests at once, each a list
of items; they are scored as one flat batch and the scores go back to the request they came from."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")
U = TypeVar("U")


def flatten(requests: Sequence[Sequence[T]]) -> tuple[list[T], list[int]]:
    """All items in request order, and how many each request had."""
    return [item for request in requests for item in request], [len(request) for request in requests]


def split(values: Sequence[U], sizes: Sequence[int]) -> list[list[U]]:
    """The inverse of flatten: `values` (one per item) cut back into one list per request."""
    if len(values) != sum(sizes):
        raise ValueError(f"split: {len(values)} values for {sum(sizes)} items")
    out, start = [], 0
    for size in sizes:
        out.append(list(values[start : start + size]))
        start += size
    return out


def chunks(n_items: int, rows: int) -> list[range]:
    """Index ranges of at most `rows` items: one forward pass each, so a full batch of large requests does not
    take memory in proportion to everything @serve.batch gathered."""
    return [range(start, min(start + rows, n_items)) for start in range(0, n_items, rows)]
