"""How many rollout workers sample each round: `rollout.schedule` ({round: workers}, from that round on) and
requests made while a run goes (`apo-ray resize RUN_DIR N` writes RUN_DIR/resize_request; the driver takes it
before its next sampling call and deletes it). Pure: files and numbers, no Ray."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

REQUEST_FILE = "resize_request"


class ResizeRequestError(ValueError):
    """A resize request that cannot be read; the message names the file and what is wrong."""


def scheduled_workers(num_workers: int, schedule: Mapping[int, int], r: int) -> int:
    """The pool's size for round r under the schedule: the entry of the latest round <= r, else num_workers."""
    started = [round_index for round_index in schedule if round_index <= r]
    return schedule[max(started)] if started else num_workers


def parse_worker_count(text: str, where: str) -> int:
    try:
        count = int(text.strip())
    except ValueError:
        raise ResizeRequestError(f"{where}: expected a number of rollout workers, got {text.strip()!r}") from None
    if count < 1:
        raise ResizeRequestError(f"{where}: the number of rollout workers must be >= 1, got {count}")
    return count


def write_resize_request(run_dir: str | Path, num_workers: int) -> Path:
    """Ask the run in `run_dir` for `num_workers` rollout workers; written whole (renamed into place), so the
    driver never reads half a request. A later request replaces one not yet taken."""
    path = Path(run_dir) / REQUEST_FILE
    parse_worker_count(str(num_workers), "num_workers")
    partial = path.with_name(f".{REQUEST_FILE}.{os.getpid()}")
    partial.write_text(f"{num_workers}\n")
    partial.replace(path)
    return path


def take_resize_request(run_dir: str | Path) -> int | None:
    """The requested number of workers, removing the request (it applies once); None without one. A request
    that cannot be read is removed too and raises ResizeRequestError naming the file."""
    path = Path(run_dir) / REQUEST_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    path.unlink(missing_ok=True)
    return parse_worker_count(text, str(path))
