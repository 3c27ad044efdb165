"""The placement plan: cluster descriptions, packing by Ray's rules, and start-up asking for the plan's numbers."""

from __future__ import annotations

import pytest

import apo_ray.cluster as cluster_module
from apo_ray.config import ConfigError, load_config
from apo_ray.placement import (
    Cluster,
    Node,
    Role,
    actor_plan,
    cluster_from_ray_nodes,
    parse_cluster,
    place,
    plan_table,
    totals,
)
from tests.conftest import REPO_ROOT


def roles(*bundles: tuple[str, int, float, float]) -> list[Role]:
    return [Role(name, count, "worker", cpus, gpus, "test", "test") for name, count, cpus, gpus in bundles]


def one_node(gpus: int, cpus: float | None = None) -> Cluster:
    return Cluster((Node("node 0", gpus, cpus),), "test")


@pytest.mark.parametrize(
    ("spec", "nodes", "gpus", "cpus"),
    [
        ("2x8gpu", 2, 8, None),
        ("2x8gpu,64cpu", 2, 8, 64.0),
        ("8gpu", 1, 8, None),
        ("4cpu", 1, 0, 4.0),
        ("nodes=2,gpus_per_node=8,cpus_per_node=64", 2, 8, 64.0),
        ("nodes=3, gpus_per_node=4", 3, 4, None),
        ("1 x 8 GPU, 64 CPU", 1, 8, 64.0),
    ],
)
def test_cluster_descriptions(spec, nodes, gpus, cpus):
    cluster = parse_cluster(spec)
    assert len(cluster.nodes) == nodes
    assert all((node.gpus, node.cpus) == (gpus, cpus) for node in cluster.nodes)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "empty"),
        ("2x8tpu", "cannot read '2x8tpu'"),
        ("nodes=2,racks=3", "unknown key 'racks'"),
        ("nodes=1.5,gpus_per_node=8", "nodes must be a whole number >= 1, got 1.5"),
        ("nodes=0,gpus_per_node=8", "nodes must be a whole number >= 1, got 0"),
        ("8gpu,gpus_per_node=4", "gpus_per_node given twice"),
        ("cpus_per_node=lots", "cpus_per_node must be a number, got 'lots'"),
        ("cpus_per_node=nan", "cpus_per_node must be a number, got 'nan'"),
    ],
)
def test_bad_cluster_descriptions_name_the_problem(spec, message):
    with pytest.raises(ConfigError, match=f"--cluster {spec!r}: {message}"):
        parse_cluster(spec)


def test_gpu_shares_below_one_are_shares_of_a_single_gpu():
    # 0.5 + 0.5 share a GPU: four fit on two.
    assert place(roles(("a", 4, 0, 0.5)), one_node(2)).fits
    # 0.6 + 0.6 do not: 1.8 GPUs in all, yet the third has no GPU with 0.6 left.
    placement = place(roles(("a", 3, 0, 0.6)), one_node(2))
    assert placement.unplaced == (("a", 2),)
    assert "no place for 1 of 3 a workers" in placement.summary
    assert "short by" not in placement.summary


def test_a_bundle_lies_on_one_node():
    two_by_four = Cluster((Node("a", 4, 16.0), Node("b", 4, 16.0)), "test")
    assert place(roles(("learner", 1, 1, 4), ("rollout", 4, 1, 1)), two_by_four).fits
    placement = place(roles(("learner", 1, 1, 8)), two_by_four)
    assert not placement.fits
    assert "the largest node has 4 GPU" in placement.shortfall[0]
    cpu_bound = place(roles(("rollout", 2, 12, 1)), Cluster((Node("a", 4, 16.0),), "test"))
    assert cpu_bound.unplaced == (("rollout", 1),)
    assert "no node has that much left" in cpu_bound.shortfall[0]


def test_the_plan_lists_every_actor_start_actors_makes():
    names = lambda cfg: [role.name for role in actor_plan(cfg)]  # noqa: E731
    assert names(load_config(None)) == ["policy", "reward", "reference", "rollout"]
    ppo = load_config(None, ["method=ppo", "rollout.num_workers=3"])
    assert names(ppo) == ["policy", "reward", "reference", "critic", "rollout"]
    assert actor_plan(ppo)[-1].count == 3


def test_threads_are_each_roles_own_and_apart_from_its_ray_cpus():
    cfg = load_config(None, ["method=ppo", "learner.threads=4", "rollout.threads=3", "learner.num_cpus=1"])
    plan = {role.name: role for role in actor_plan(cfg)}
    assert {name: role.threads for name, role in plan.items()} == {
        "policy": 4,
        "reward": 4,
        "reference": 4,
        "critic": 4,
        "rollout": 3,
    }
    assert plan["policy"].cpus == 1 and plan["reference"].cpus == 0.5
    assert {role.threads for role in actor_plan(load_config(None))} == {None}


def test_the_table_adds_up():
    cfg = load_config(
        None, ["method=ppo", "learner.num_gpus=1", "rollout.num_workers=2", "rollout.num_gpus_per_worker=1"]
    )
    plan = actor_plan(cfg)
    total_row = plan_table(plan)[-1].split()
    assert float(total_row[-1]) == sum(role.count * role.gpus for role in plan) == totals(plan)["GPU"]
    assert total_row[1] == str(sum(role.count for role in plan))


def test_a_running_clusters_nodes_are_read_per_node():
    nodes = [
        {"Alive": True, "NodeID": "a" * 16, "NodeManagerAddress": "10.0.0.1", "Resources": {"CPU": 64.0, "GPU": 8.0}},
        {"Alive": False, "NodeID": "b" * 16, "NodeManagerAddress": "10.0.0.2", "Resources": {"CPU": 64.0, "GPU": 8.0}},
        {"Alive": True, "NodeID": "c" * 16, "NodeManagerAddress": "10.0.0.3", "Resources": {"CPU": 16.0}},
    ]
    cluster = cluster_from_ray_nodes(nodes, "test")
    assert [(node.gpus, node.cpus) for node in cluster.nodes] == [(8, 64.0), (0, 16.0)]


class _RecordedGroup:
    """Stands in for LearnerGroup: records the ranks and the bundle each learner asks for."""

    asked: list[tuple[str, int, float, float]] = []

    def __init__(self, cls, count, *, role, name_prefix, num_cpus_per_rank, num_gpus_per_rank, **kwargs):
        self.asked.append((role, count, num_cpus_per_rank, num_gpus_per_rank))
        self.group = object()


class _RecordedPool:
    asked: list[tuple[int, float, float]] = []

    @classmethod
    def from_config(cls, cfg, policy_path, **kwargs):
        rollout = cfg.rollout
        cls.asked.append((rollout.num_workers, rollout.num_cpus_per_worker, rollout.num_gpus_per_worker))
        return cls()


def test_start_actors_asks_ray_for_the_plans_bundles(monkeypatch):
    monkeypatch.setattr(cluster_module, "LearnerGroup", _RecordedGroup)
    monkeypatch.setattr(cluster_module, "RolloutPool", _RecordedPool)
    monkeypatch.setattr(cluster_module, "actor_env", lambda threads=None: {})
    # The recorded groups start no actor: there is nothing to wait for.
    monkeypatch.setattr(cluster_module, "wait_until_ready", lambda groups, timeout_s, diagnose: None)
    _RecordedGroup.asked, _RecordedPool.asked = [], []
    cfg = load_config(
        None,
        [
            "method=ppo",
            "learner.num_cpus=3",
            "learner.num_gpus=1",
            "rollout.num_workers=2",
            "rollout.num_gpus_per_worker=1",
            "rollout.num_cpus_per_worker=2",
            "learner.num_ranks=2",
            "learner.critic_ranks=3",
        ],
    )
    cluster_module.start_actors(cfg, "policy-dir", "reward-dir")
    learners = [(role.name, role.count, role.cpus, role.gpus) for role in actor_plan(cfg) if role.name != "rollout"]
    assert _RecordedGroup.asked == learners
    assert [count for _, count, _, _ in _RecordedGroup.asked] == [2, 2, 1, 3]
    rollout = actor_plan(cfg)[-1]
    assert _RecordedPool.asked == [(rollout.count, rollout.cpus, rollout.gpus)]
    assert cluster_module.required_resources(cfg) == totals(actor_plan(cfg))


# GRPO's KL hard limit decides per minibatch, on one policy rank.
@pytest.mark.parametrize(
    "game, role, overrides",
    [("aapa_grpo.yaml", "discriminator", ["ppo.kl_hard_limit=false"]), ("apl.yaml", "attacker", [])],
)
def test_the_sibling_games_learners_are_one_rank_groups_beside_a_multi_rank_game(monkeypatch, game, role, overrides):
    monkeypatch.setattr(cluster_module, "LearnerGroup", _RecordedGroup)
    monkeypatch.setattr(cluster_module, "RolloutPool", _RecordedPool)
    monkeypatch.setattr(cluster_module, "actor_env", lambda threads=None: {})
    monkeypatch.setattr(cluster_module, "wait_until_ready", lambda groups, timeout_s, diagnose: None)
    _RecordedGroup.asked, _RecordedPool.asked = [], []
    cfg = load_config(REPO_ROOT / "configs" / game, ["learner.num_ranks=2", *overrides])
    actors = cluster_module.start_actors(cfg, "policy-dir", "reward-dir", attacker_path="attacker-dir")
    plan = [(r.name, r.count, r.cpus, r.gpus) for r in actor_plan(cfg) if r.unit == "rank"]
    assert _RecordedGroup.asked == plan
    counts = {name: count for name, count, _, _ in plan}
    assert (counts["policy"], counts["reward"], counts[role]) == (2, 2, 1)
    assert getattr(actors, role) in actors.learners


def test_custom_resources_pin_roles_to_the_nodes_that_have_them():
    cfg = load_config(
        None, ["learner.resources={learner_node: 1}", "rollout.resources={rollout_node: 1}", "rollout.num_workers=2"]
    )
    nodes = [
        {
            "Alive": True,
            "NodeManagerAddress": "10.0.0.1",
            "NodeID": "aaaaaaaa01",
            "Resources": {"CPU": 8.0, "learner_node": 3.0, "node:10.0.0.1": 1.0, "memory": 1e9},
        },
        {
            "Alive": True,
            "NodeManagerAddress": "10.0.0.2",
            "NodeID": "bbbbbbbb02",
            "Resources": {"CPU": 8.0, "rollout_node": 1.0},
        },
        {
            "Alive": True,
            "NodeManagerAddress": "10.0.0.3",
            "NodeID": "cccccccc03",
            "Resources": {"CPU": 8.0, "rollout_node": 1.0},
        },
    ]
    cluster = cluster_from_ray_nodes(nodes, "test")
    assert [node.resources for node in cluster.nodes] == [
        {"learner_node": 3.0},
        {"rollout_node": 1.0},
        {"rollout_node": 1.0},
    ]
    placement = place(actor_plan(cfg), cluster)
    assert placement.fits
    # The policy, RM and reference (3 units of learner_node) on the first node; one worker on each of the others,
    # though any node has the CPUs for all of them.
    assert [bundles for _, bundles, _, _ in placement.assigned] == [
        (("policy", 0), ("reward", 0), ("reference", 0)),
        (("rollout", 0),),
        (("rollout", 1),),
    ]
    # A third worker finds no rollout_node left; a role asking for a resource no node has is named with it.
    three = place(
        actor_plan(load_config(None, ["rollout.resources={rollout_node: 1}", "rollout.num_workers=3"])), cluster
    )
    assert three.unplaced == (("rollout", 2),)
    nowhere = place(actor_plan(load_config(None, ["learner.resources={gpu_box: 1}"])), cluster)
    assert "no node has 1 of the custom resource 'gpu_box'" in "\n".join(nowhere.shortfall)
    # A described cluster names no custom resources: they are not checked.
    assert place(actor_plan(cfg), parse_cluster("3x0gpu,8cpu")).fits


def test_custom_resources_are_only_custom():
    with pytest.raises(ConfigError, match=r"rollout\.resources: .*CPU: set by the CPU and GPU keys"):
        load_config(None, ["rollout.resources={CPU: 1}"])
