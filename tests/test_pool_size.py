"""The rollout pool's size per round (apo_ray/pool_size.py, rollout.schedule, `apo-ray resize`), the keys of
bucketed sync and asynchronous rollouts, and splitting one pool call's rollouts back into its prompt lists."""

from __future__ import annotations

import pytest

from apo_ray.cli import main as cli_main
from apo_ray.config import ConfigError, load_config
from apo_ray.game import Rollout, split_rollouts
from apo_ray.placement import actor_plan
from apo_ray.pool_size import (
    REQUEST_FILE,
    ResizeRequestError,
    scheduled_workers,
    take_resize_request,
    write_resize_request,
)


def test_the_schedule_holds_each_size_from_its_round_on():
    schedule = {3: 4, 6: 2}
    assert [scheduled_workers(1, schedule, r) for r in range(1, 9)] == [1, 1, 4, 4, 4, 2, 2, 2]
    assert scheduled_workers(3, {}, 5) == 3


def test_a_request_is_taken_once_and_a_bad_one_names_its_file(tmp_path):
    assert take_resize_request(tmp_path) is None
    write_resize_request(tmp_path, 2)
    write_resize_request(tmp_path, 3)  # replaces the one not taken yet
    assert take_resize_request(tmp_path) == 3
    assert take_resize_request(tmp_path) is None
    (tmp_path / REQUEST_FILE).write_text("four\n")
    with pytest.raises(ResizeRequestError, match=f"{REQUEST_FILE}: expected a number of rollout workers, got 'four'"):
        take_resize_request(tmp_path)
    assert not (tmp_path / REQUEST_FILE).exists()
    with pytest.raises(ResizeRequestError, match="must be >= 1, got 0"):
        write_resize_request(tmp_path, 0)


def test_apo_ray_resize_writes_the_request_into_a_run_directory_only(tmp_path, capsys):
    assert cli_main(["resize", str(tmp_path), "2"]) == 2
    assert "not a run directory" in capsys.readouterr().err
    (tmp_path / "config.yaml").write_text("method: rjs\n")
    assert cli_main(["resize", str(tmp_path), "2"]) == 0
    assert take_resize_request(tmp_path) == 2


def test_schedule_and_sync_keys_are_checked_by_name():
    for overrides, message in [
        (["rollout.schedule={0: 2}"], r"rollout.schedule \(key 0\): must be >= 1, got 0"),
        (["rollout.schedule={2: 0}"], "rollout.schedule.2: must be >= 1, got 0"),
        (["rounds=3", "rollout.schedule={4: 2}"], r"rollout.schedule.4: round 4 is past the last round \(rounds=3\)"),
        (["rollout.sync_bucket_mb=0"], "rollout.sync_bucket_mb: must be >= 1, got 0"),
        (["method=grpo", "ppo.async_rollouts=true", "ppo.tis=false"], "ppo.async_rollouts: .* need ppo.tis=true"),
        (["method=rjs", "ppo.async_rollouts=true"], "ppo.async_rollouts: read only by the online methods"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(None, overrides)


def test_the_placement_plan_reserves_the_schedules_largest_pool():
    cfg = load_config(None, ["rounds=4", "rollout.num_workers=2", "rollout.schedule={2: 3, 4: 1}"])
    assert cfg.rollout.peak_workers == 3
    assert {role.name: role.count for role in actor_plan(cfg)}["rollout"] == 3
    assert load_config(None, []).rollout.peak_workers == 1


def rollout(prompt_index: int) -> Rollout:
    return Rollout(prompt_index=prompt_index, prompt=f"p{prompt_index}", response="", policy_version=0)


def test_split_rollouts_reindexes_the_second_prompt_list():
    joined = [rollout(i) for i in (0, 0, 1, 1, 2, 2)]
    first, second = split_rollouts(joined, 2)
    assert [r.prompt_index for r in first] == [0, 0, 1, 1]
    assert [(r.prompt_index, r.prompt) for r in second] == [(0, "p2"), (0, "p2")]
    assert split_rollouts(joined, 0)[0] == [] and split_rollouts(joined, 3)[1] == []
