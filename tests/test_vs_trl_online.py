"""benchmarks/vs_trl_online.py refuses settings that would not give both arms the same batches, and a missing
RM, before anything loads; --quick is one iteration of one repeat."""

from __future__ import annotations

import pytest

from benchmarks.vs_trl_online import parse_args


@pytest.fixture
def rm_dir(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    return str(tmp_path)


def test_quick_is_one_iteration_of_whole_minibatches(rm_dir):
    args = parse_args(["--quick", "--rm", rm_dir])
    assert (args.repeats, args.iterations, args.prompts_per_iteration * args.group % args.minibatch) == (1, 1, 0)


@pytest.mark.parametrize("settings, message", [
    (["--group", "3", "--minibatch", "64"], r"--prompts-per-iteration x --group \(96\) must be a multiple of "
                                            r"--minibatch \(64\)"),
    (["--micro-batch", "5"], r"--minibatch \(32\) must be a multiple of --micro-batch \(5\)"),
])
def test_unequal_batches_are_refused(rm_dir, settings, message):
    with pytest.raises(SystemExit, match=message):
        parse_args([*settings, "--rm", rm_dir])


def test_a_missing_rm_names_the_command_that_fits_it(tmp_path):
    with pytest.raises(SystemExit, match=r"--rm .*: no fitted RM there; make it with `apo-ray rm --config "
                                         r"configs/stages/rm_hh_minilm_cpu.yaml`"):
        parse_args(["--rm", str(tmp_path)])


def test_the_apo_ray_arm_is_the_recipe_as_grpo_with_the_shared_settings(rm_dir, tmp_path):
    from benchmarks.vs_trl_online import game_config

    args = parse_args(["--rm", rm_dir, "--iterations", "3", "--group", "8", "--lr", "3e-6", "--kl", "0.02"])
    cfg = game_config(args, tmp_path / "run")
    assert (cfg.method, cfg.apo, cfg.rounds, cfg.samples_per_prompt, cfg.policy.lr) == ("grpo", False, 3, 8, 3e-6)
    assert (cfg.ppo.prompts_per_iteration, cfg.ppo.minibatch_size, cfg.ppo.ppo_epochs) == (32, 32, 2)
    assert (cfg.ppo.kl_coef, cfg.ppo.kl_estimator) == (0.02, "k3")
    assert cfg.model.max_response_tokens == 64 and cfg.rollout.backend == "vllm" and cfg.learner.backend == "deepspeed"
