"""The soak's trend math (hand-computed slopes and intervals) and its recorder, which reads a real Ray actor's
resident memory and open file descriptors from its process."""

from __future__ import annotations

import math

import pytest

from benchmarks.common import linear_trend
from benchmarks.soak import fit


def test_a_perfect_line_has_its_slope_and_a_zero_width_interval():
    trend = linear_trend([0, 10, 20, 30], [5.0, 7.0, 9.0, 11.0])
    assert (trend["slope"], trend["intercept"], trend["stderr"]) == pytest.approx((0.2, 5.0, 0.0))
    assert trend["lo"] == pytest.approx(0.2) and trend["hi"] == pytest.approx(0.2)


def test_the_interval_is_the_t_quantile_times_the_slope_standard_error():
    # x = 0..3, y = 1, 3, 2, 4: Sxy = 4, Sxx = 5, slope 0.8, intercept 2.5 - 0.8 * 1.5 = 1.3;
    # residuals -0.3, 0.9, -0.9, 0.3: SSE = 1.8, stderr = sqrt(1.8 / 2 / 5) = sqrt(0.18);
    # t(0.975, 2 df) = 4.3026527, half-width 4.3026527 * 0.4242641 = 1.8254610
    trend = linear_trend([0, 1, 2, 3], [1.0, 3.0, 2.0, 4.0])
    assert trend["slope"] == pytest.approx(0.8)
    assert trend["intercept"] == pytest.approx(1.3)
    assert trend["stderr"] == pytest.approx(math.sqrt(0.18))
    assert (trend["lo"], trend["hi"]) == pytest.approx((0.8 - 1.8254610, 0.8 + 1.8254610), abs=1e-6)


def test_a_trend_needs_three_points_at_two_x_values():
    with pytest.raises(ValueError, match="three"):
        linear_trend([0, 1], [0.0, 1.0])
    with pytest.raises(ValueError, match="every x is the same"):
        linear_trend([5, 5, 5], [0.0, 1.0, 2.0])


def test_the_fit_leaves_out_the_warm_up_and_calls_growth_only_when_the_interval_is_above_zero():
    # A start-up jump in the warm-up, then flat with noise: no upward trend once the warm-up is left out.
    points = [(0, 100.0), (10, 300.0), (20, 500.0), (30, 501.0), (40, 499.0), (50, 501.0), (60, 499.0)]
    flat = fit(points, warmup=30)
    assert flat["n"] == 4 and flat["first"] == 501.0 and flat["span_iterations"] == 30
    assert flat["slope"] == pytest.approx(-0.04) and flat["lo"] < 0 < flat["hi"] and not flat["grows"]
    assert fit(points, warmup=0)["grows"]
    assert fit(points, warmup=50) is None  # two records are too few for an interval


def test_the_recorder_reads_a_real_actors_memory_and_file_descriptors(ray_cluster, tmp_path):
    ray = ray_cluster
    from benchmarks.soak import Recorder

    @ray.remote(num_cpus=0)
    class Holder:
        def __init__(self):
            self.data = None
            self.files = []

        def grow(self, mib: int, files: int) -> None:
            self.data = bytearray(mib * 2**20)  # zero-filled: every page is touched
            self.files = [open(tmp_path / f"f{i}", "w") for i in range(files)]

    # On the suite's shared cluster: other tests' named actors may be alive beside it, so only its own are checked.
    holder = Holder.options(name="holder-0a1b2c-0").remote()
    try:
        recorder = Recorder(tmp_path / "metrics.jsonl", every=1, log=lambda line: None)
        before = recorder.record(0, None)["processes"]["holder-0"]
        ray.get(holder.grow.remote(200, 20))
        after = recorder.record(1, None)["processes"]["holder-0"]
        assert {"driver", "holder-0a1b2c-0"} <= set(recorder.pids)  # records name it without the run id
        assert after["rss_bytes"] - before["rss_bytes"] >= 190 * 2**20
        # One run read 21 for the 20 files: Ray's worker opened a descriptor of its own during the task.
        assert 20 <= after["fds"] - before["fds"] <= 21
        assert recorder.records[-1]["object_store_bytes"] >= 0
    finally:
        ray.kill(holder)
