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


@pytest.mark.parametrize(
    "settings, message",
    [
        (
            ["--group", "3", "--minibatch", "64"],
            r"--prompts-per-iteration x --group \(96\) must be a multiple of "
            r"--minibatch \(64\)",
        ),
        (["--micro-batch", "5"], r"--minibatch \(32\) must be a multiple of --micro-batch \(5\)"),
    ],
)
def test_unequal_batches_are_refused(rm_dir, settings, message):
    with pytest.raises(SystemExit, match=message):
        parse_args([*settings, "--rm", rm_dir])


def test_a_missing_rm_names_the_command_that_fits_it(tmp_path):
    with pytest.raises(
        SystemExit,
        match=r"--rm .*: no fitted RM there; make it with `apo-ray rm --config "
        r"configs/stages/rm_hh_minilm_cpu.yaml`",
    ):
        parse_args(["--rm", str(tmp_path)])


def test_the_apo_ray_arm_is_the_recipe_as_grpo_with_the_shared_settings(rm_dir, tmp_path):
    from benchmarks.vs_trl_online import game_config

    args = parse_args(["--rm", rm_dir, "--iterations", "3", "--group", "8", "--lr", "3e-6", "--kl", "0.02"])
    cfg = game_config(args, tmp_path / "run")
    assert (cfg.method, cfg.apo, cfg.rounds, cfg.samples_per_prompt, cfg.policy.lr) == ("grpo", False, 3, 8, 3e-6)
    assert (cfg.ppo.prompts_per_iteration, cfg.ppo.minibatch_size, cfg.ppo.ppo_epochs) == (32, 32, 2)
    assert (cfg.ppo.kl_coef, cfg.ppo.kl_estimator) == (0.02, "k3")
    assert cfg.model.max_response_tokens == 64 and cfg.rollout.backend == "vllm" and cfg.learner.backend == "deepspeed"


def test_the_summary_reports_each_ratio_from_the_interleaved_repeats(rm_dir, tmp_path):
    """Rates are iterations over the iterations' seconds, ratios pair repeat i with repeat i, and the phase
    table shows both apo-ray arms' seconds and threads."""
    from benchmarks.common import BenchmarkRun, Timing, Trial
    from benchmarks.vs_trl_online import summarize

    args = parse_args(["--rm", rm_dir, "--iterations", "2", "--repeats", "2", "--out", str(tmp_path)])

    def trial(arm, repeat, seconds):
        phases = [
            {"timing/generate": s / 4, "timing/policy_step": s / 2, "efficiency/policy_step": 0.5} for s in seconds
        ]
        return Trial(
            arm,
            repeat,
            Timing(sum(seconds), 0.5, 0.6),
            {
                "iteration_s": seconds,
                "reward": [0.1, 0.2],
                "phases": phases,
                "ceilings": {"ceiling/policy": 1e11, "threads/policy": 2.0 if arm == "apo-ray" else 1.0},
            },
        )

    seconds = {
        "apo-ray": ([10, 10], [20, 20]),
        "apo-ray-ray-threads": ([20, 20], [30, 30]),
        "trl": ([40, 40], [40, 40]),
    }
    trials = [trial(arm, r, seconds[arm][r]) for r in (0, 1) for arm in seconds]
    run = BenchmarkRun("vs_trl_online", "test", args)
    out = summarize(args, run, trials, ("generate", "chosen"), (1e11, 1e11))
    assert out["iterations_per_s"]["apo-ray"] == [0.1, 0.05]
    assert out["apo_ray_over_trl"]["per_repeat"] == [4.0, 2.0]
    assert out["machine_threads_over_ray_threads"]["per_repeat"] == [2.0, 1.5]
    phases = next(section for section in run.sections if section.startswith("## apo-ray phases"))
    # Medians: generate of 2.5, 2.5, 5, 5 s; policy_step of 5, 5, 10, 10 s and of 10, 10, 15, 15 s
    assert "| generate | 3.750 |" in phases and "| policy_step | 7.500 | 0.500 | 12.500 | 0.500 |" in phases
    assert "apo-ray: policy 2; apo-ray-ray-threads: policy 1" in phases
