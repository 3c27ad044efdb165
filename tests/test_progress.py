import io
import logging

import pytest

from apo_ray.progress import Progress


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def progress_records(caplog) -> list[tuple[int, str]]:
    return [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "apo_ray.progress"]


def test_without_a_terminal_logs_at_most_one_line_per_interval_and_one_at_the_end(caplog):
    stream, clock = io.StringIO(), FakeClock()
    with caplog.at_level(logging.INFO, logger="apo_ray"):
        with Progress("generate", total=100, unit="samples", stream=stream, min_interval_s=30, clock=clock) as progress:
            for _ in range(100):
                clock.now += 1.0
                progress.update()
    assert progress_records(caplog) == [
        (logging.INFO, "[generate] running: 30/100 samples in 30.0 s (1.0 samples/s)"),
        (logging.INFO, "[generate] running: 60/100 samples in 60.0 s (1.0 samples/s)"),
        (logging.INFO, "[generate] running: 90/100 samples in 90.0 s (1.0 samples/s)"),
        (logging.INFO, "[generate] done: 100/100 samples in 100.0 s (1.0 samples/s)"),
    ]
    assert stream.getvalue() == ""


def test_work_finished_before_the_phase_is_counted_and_named_not_divided_by_the_wait(caplog):
    """A call submitted earlier and collected now (the overlapped evaluation's samples): no rate of 2048 samples
    over a wait of nearly nothing, but what was ready and how long the rest took to come."""
    clock = FakeClock()
    with caplog.at_level(logging.INFO, logger="apo_ray"):
        with Progress("generate", total=2048, unit="samples", ready=2048, stream=io.StringIO(), clock=clock):
            clock.now = 0.008
        with Progress(
            "generate", total=2048, unit="samples", ready=1536, stream=io.StringIO(), min_interval_s=30, clock=clock
        ) as progress:
            clock.now += 40.0
            progress.update(256)
            clock.now += 5.0
            progress.update(256)
    assert progress_records(caplog) == [
        (logging.INFO, "[generate] done: 2048/2048 samples (2048 finished during earlier steps); waited 0.0 s"),
        (logging.INFO, "[generate] running: 1792/2048 samples (1536 finished during earlier steps); waited 40.0 s"),
        (logging.INFO, "[generate] done: 2048/2048 samples (1536 finished during earlier steps); waited 45.0 s"),
    ]


def test_a_failing_phase_says_so_as_a_warning(caplog):
    clock = FakeClock()
    with pytest.raises(RuntimeError):
        with Progress("rm_step", stream=io.StringIO(), clock=clock) as progress:
            progress.update(3)
            clock.now = 2.0
            raise RuntimeError("boom")
    assert progress_records(caplog) == [(logging.WARNING, "[rm_step] failed: 3 it in 2.0 s (1.5 it/s)")]


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_on_a_terminal_draws_a_tqdm_bar_instead_of_logging(caplog):
    stream = Terminal()
    with caplog.at_level(logging.INFO, logger="apo_ray"):
        with Progress("policy_step", total=4, unit="batch", stream=stream) as progress:
            progress.update(4)
    assert "\r" in stream.getvalue()
    assert "policy_step" in stream.getvalue()
    assert "4/4" in stream.getvalue()
    assert progress_records(caplog) == []
