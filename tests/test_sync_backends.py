"""The weight-sync backends' registry (apo_ray/sync_backends/): what each backend declares is what the config's
choices and checks, the dry run and the learners' start-up read, for every registered backend."""

from __future__ import annotations

import pytest

from apo_ray.cluster import POLICY_RANK_ZERO_METHODS
from apo_ray.config import ConfigError, RolloutConfig, keys_the_run_ignores, load_config
from apo_ray.sync_backends import SEND_RANK0, SyncBackend, backend_names, backends, cluster_refusal
from apo_ray.train import main

NAMES = backend_names()


def test_the_key_offers_the_registered_backends_and_describes_each():
    assert set(NAMES) == {"object_store", "disk", "nccl"}
    field = RolloutConfig.model_fields["weight_sync"]
    assert field.annotation.__args__ == NAMES
    for backend in backends():
        assert f"'{backend.name}' ({backend.about}" in field.description
    with pytest.raises(ConfigError, match=r"rollout\.weight_sync"):
        load_config(None, ["rollout.weight_sync=ftp"])


@pytest.mark.parametrize("name", NAMES)
def test_a_backends_needs_are_the_configs_refusals(name):
    backend = next(b for b in backends() if b.name == name)
    checks = [
        (["rollout.backend=hf"], backend.needs_vllm, rf"^rollout\.weight_sync: '{name}' needs rollout\.backend"),
        (
            ["learner.zero_stage=3"],
            not backend.gathers_zero3,
            rf"^rollout\.weight_sync: '{name}' does not gather ZeRO-3 shards yet; .* 'object_store' or 'disk' at",
        ),
    ]
    for overrides, refused, message in checks:
        if refused:
            with pytest.raises(ConfigError, match=message):
                load_config(None, [f"rollout.weight_sync={name}", *overrides])
        else:
            load_config(None, [f"rollout.weight_sync={name}", *overrides])
    # rollout.sync_bucket_mb is refused as ignored exactly where the backend reads no buckets.
    ignored = keys_the_run_ignores(load_config(None, [f"rollout.weight_sync={name}"]))
    assert ("rollout.sync_bucket_mb" in ignored) == (not backend.uses_buckets)


@pytest.mark.parametrize("name", NAMES)
def test_the_dry_run_refuses_a_backend_that_needs_a_gpu_on_a_cpu_cluster(name, capsys):
    backend = next(b for b in backends() if b.name == name)
    code = main([f"rollout.weight_sync={name}", "--cluster", "4cpu", "--dry-run"])
    err = capsys.readouterr().err
    if backend.needs_gpu:
        assert code == 2
        assert (
            f"rollout.weight_sync: '{name}' {backend.needs_gpu} and the cluster has no GPU; use 'object_store' "
            "or 'disk' on a CPU-only cluster"
        ) in err
    else:
        assert code == 0, err
        assert "rollout.weight_sync" not in err


def test_the_dry_run_tells_a_cluster_of_nodes_that_the_disk_sync_needs_a_shared_filesystem(capsys):
    shared = [b.name for b in backends() if b.shared_filesystem]
    assert shared == ["disk"]
    assert main(["rollout.weight_sync=disk", "--cluster", "2x0gpu,4cpu", "--dry-run"]) == 0
    assert (
        "note: rollout.weight_sync 'disk' hands the workers files under run_dir: on 2 nodes" in capsys.readouterr().out
    )
    assert main(["rollout.weight_sync=object_store", "--cluster", "2x0gpu,4cpu", "--dry-run"]) == 0
    assert "note: rollout.weight_sync" not in capsys.readouterr().out


def test_the_learners_rank_zero_methods_are_the_backends_that_send_from_rank_zero():
    assert POLICY_RANK_ZERO_METHODS == (SEND_RANK0,)
    assert [b.name for b in backends() if b.learner_method() in POLICY_RANK_ZERO_METHODS] == ["nccl"]
    assert cluster_refusal("nccl", 1) is None and cluster_refusal("object_store", 0) is None


def test_a_declaration_that_cannot_hold_is_refused_when_its_module_is_imported():
    with pytest.raises(ValueError, match="weight sync broken: a rank-0 send neither streams"):
        type("Broken", (SyncBackend,), {"name": "broken", "about": "", "rank0_only": True})
