"""Joining or starting the Ray cluster, and starting the game's actors with their resources."""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from apo_ray import build_locks, logs
from apo_ray.actor_group import wait_until_ready
from apo_ray.actors.critic import CriticLearner
from apo_ray.actors.discriminator import Discriminator
from apo_ray.actors.policy import PolicyLearner
from apo_ray.actors.reference import ReferenceModel
from apo_ray.actors.reward import RewardLearner
from apo_ray.chat import template_setting
from apo_ray.config import Config, LearnerConfig
from apo_ray.deadlines import probe_cluster
from apo_ray.driver import Actors
from apo_ray.fault_injection import passed_on as injected_faults
from apo_ray.learner_group import LearnerGroup, RenamedMethods
from apo_ray.placement import Role, actor_plan, cluster_from_ray_nodes, local_num_cpus, place, totals
from apo_ray.ray_env import driver_source_env
from apo_ray.rollout_pool import RolloutPool
from apo_ray.sync_backends import rank_zero_learner_methods

log = logging.getLogger(__name__)

# vLLM must keep its engine in the actor's own process: across its multiprocess boundary, weight tensors
# turn into lists (docs/architecture.md). DeepSpeed picks its CPU accelerator only when told to.
ACTOR_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TOKENIZERS_PARALLELISM": "false"}


def cpu_only() -> bool:
    return not ray.cluster_resources().get("GPU", 0)


def actor_env(threads: int | None = None) -> dict[str, str]:
    """`threads`: the actor's OMP_NUM_THREADS, which Ray then leaves alone; None leaves Ray's (its Ray CPUs)."""
    # The driver's logging choice, for actors on nodes whose processes do not inherit its environment.
    env = {**ACTOR_ENV, **logs.worker_env()}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    env.update(injected_faults())
    if cpu_only():
        env["DS_ACCELERATOR"] = "cpu"
    return env


def required_resources(cfg: Config) -> dict[str, float]:
    """Logical CPUs and GPUs of all the run's actors, as start_actors asks for them."""
    return totals(actor_plan(cfg))


def init_ray(cfg: Config) -> None:
    """Join the cluster this driver was submitted to (RAY_ADDRESS, or ray.address), else start one."""
    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    options = logs.ray_init_options()
    log.debug("ray.init options: %s", options)
    if address:
        probe_cluster(address, cfg.ray.connect_timeout_s, "ray.connect_timeout_s")
        ray.init(address=address, log_to_driver=True, **options)
        log.info("joined the Ray cluster at %s", address)
        return
    num_cpus = local_num_cpus(cfg)
    options["runtime_env"]["env_vars"] = driver_source_env()
    # "local": a bare ray.init() joins a `ray start` cluster on this machine, which refuses num_cpus; a run
    # without an address starts its own, as documented, and ray.address=auto joins that one.
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=True, **options)
    log.info(
        "started a local Ray cluster with %d logical CPUs (ray.address=auto would join a running "
        "`ray start` cluster instead)",
        num_cpus,
    )
    placement = place(actor_plan(cfg), cluster_from_ray_nodes(ray.nodes(), "this machine's Ray"))
    if not placement.fits:
        # Otherwise the placement groups would wait ten minutes for resources this machine does not have.
        ray.shutdown()
        raise RuntimeError(
            f"the run's actors do not fit: {placement.summary} (`apo-ray train --dry-run` shows the plan)"
        )


# The policy learner's methods that weight-sync backends declared rank 0's alone (apo_ray/sync_backends/): below
# ZeRO-3 rank 0 holds every weight and sends them without the other ranks.
POLICY_RANK_ZERO_METHODS = rank_zero_learner_methods()


# LoRA's reference (learner.lora.reference_actor false): the policy learner's methods that read its base weights.
POLICY_AS_REFERENCE = {"token_logprobs": "reference_token_logprobs", "sequence_logprobs": "reference_sequence_logprobs"}


def _learner(
    cls, name: str, role: Role, *, distributed: bool = True, rank_zero_methods: tuple[str, ...] = (), **kwargs
) -> LearnerGroup:
    """A learner's ranks (role.count), each in a bundle of its own, in one placement group per role."""
    return LearnerGroup(
        cls,
        role.count,
        role=role.name,
        name_prefix=name,
        kwargs=kwargs,
        num_cpus_per_rank=role.cpus,
        num_gpus_per_rank=role.gpus,
        resources_per_rank=role.resources,
        env=actor_env(role.threads),
        distributed=distributed,
        rank_zero_methods=rank_zero_methods,
    )


def start_actors(cfg: Config, policy_path: str, reward_path: str, attacker_path: str | None = None) -> Actors:
    """Every actor of the plan (apo_ray.placement.actor_plan); `attacker_path` is APL's attacker model."""
    # Names carry a run id so two runs on one cluster do not collide on the dashboard.
    run_id = uuid.uuid4().hex[:6]
    learner = cfg.learner
    # "auto" resolved once, here, for every learner (the rollout pool takes cfg.rollout_dtype).
    dtype = cfg.learner_dtype
    model = cfg.model.model_copy(update={"dtype": dtype})
    # The bundles the dry run prints (apo_ray.placement) are the ones asked for here.
    roles = {role.name: role for role in actor_plan(cfg)}
    groups = {
        "policy": _learner(
            PolicyLearner,
            f"policy-learner-{run_id}",
            roles["policy"],
            model_path=policy_path,
            model=model,
            policy=cfg.policy,
            learner=learner,
            seed=cfg.seed,
            micro_batch_size=cfg.ppo.minibatch_size if cfg.online else cfg.policy.batch_size,
            rank_zero_methods=POLICY_RANK_ZERO_METHODS,
            chat_template=template_setting(cfg.data.chat_template),
        ),
        "reward": _learner(
            RewardLearner,
            f"reward-learner-{run_id}",
            roles["reward"],
            model_path=reward_path,
            reward=cfg.reward,
            learner=learner,
            dtype=dtype,
            seed=cfg.seed,
            trust_remote_code=cfg.model.trust_remote_code,
        ),
    }
    if "reference" in roles:
        groups["reference"] = _learner(
            ReferenceModel,
            f"reference-{run_id}",
            roles["reference"],
            distributed=False,
            model_path=policy_path,
            model=model,
        )
    if "eval_reward" in roles:
        groups["eval_reward"] = _learner(
            RewardLearner,
            f"eval-reward-{run_id}",
            roles["eval_reward"],
            model_path=cfg.model.eval_reward,
            reward=cfg.reward,
            learner=learner,
            dtype=dtype,
            trainable=False,
            trust_remote_code=cfg.model.trust_remote_code,
            distributed=False,
        )
    if "critic" in roles:
        # Built from reward_path so that a tokenizer or head mismatch shows when the actor starts; the online
        # game reloads it from the RM as fitted in iteration 0 when critic_init is "reward".
        groups["critic"] = _learner(
            CriticLearner,
            f"critic-{run_id}",
            roles["critic"],
            model_path=reward_path if cfg.ppo.critic_init == "reward" else policy_path,
            tokenizer_path=policy_path,
            model=model,
            ppo=cfg.ppo,
            learner=learner,
            seed=cfg.seed,
        )
    if "discriminator" in roles:
        path = reward_path if cfg.aapa.discriminator_path == "reward" else cfg.aapa.discriminator_path
        # One rank (apo_ray.placement): it trains alone, on no rendezvous.
        groups["discriminator"] = _learner(
            Discriminator,
            f"discriminator-{run_id}",
            roles["discriminator"],
            distributed=False,
            model_path=path,
            aapa=cfg.aapa,
            learner=learner,
            dtype=dtype,
            seed=cfg.seed,
            trust_remote_code=cfg.model.trust_remote_code,
        )
    if "attacker" in roles:
        if attacker_path is None:
            raise ValueError("apl.enabled: start_actors needs attacker_path, the attacker's model")
        groups["attacker"] = _learner(
            PolicyLearner,
            f"attacker-learner-{run_id}",
            roles["attacker"],
            model_path=attacker_path,
            model=model,
            policy=cfg.policy.model_copy(update={"lr": cfg.apl.attacker.lr}),
            learner=learner,
            seed=cfg.seed,
            micro_batch_size=cfg.apl.attacker.minibatch_size,
            rank_zero_methods=POLICY_RANK_ZERO_METHODS,
            engine_role="attacker",
        )
    for group in groups.values():
        group.call_timeout_s = learner.call_timeout_s
    pools: list[RolloutPool] = []
    try:
        pools.append(
            RolloutPool.from_config(
                cfg, policy_path, name_prefix=f"rollout-{run_id}", env=actor_env(roles["rollout"].threads)
            )
        )
        if "attacker_rollout" in roles:
            pools.append(attacker_rollout_pool(cfg, attacker_path, name_prefix=f"attacker-rollout-{run_id}"))
        wait_until_ready(
            [group.group for group in groups.values()],
            learner.startup_timeout_s,
            diagnose=lambda: learner_startup_hint(learner),
        )
    except BaseException:
        for group in groups.values():
            group.kill()
        for pool in pools:
            pool.shutdown()
        raise
    if "reference" not in groups:
        groups["reference"] = RenamedMethods(groups["policy"], POLICY_AS_REFERENCE)
    return Actors(pool=pools[0], attacker_pool=pools[1] if len(pools) > 1 else None, **groups)


def attacker_rollout_pool(cfg: Config, attacker_path: str, *, name_prefix: str) -> RolloutPool:
    """APL's attacker workers: the game's rollout settings, with the attacker's size, length and temperature."""
    attacker = cfg.apl.attacker
    rollout = cfg.rollout.model_copy(
        update={
            "num_workers": attacker.rollout_workers,
            "num_cpus_per_worker": attacker.rollout_num_cpus_per_worker,
            "num_gpus_per_worker": attacker.rollout_num_gpus_per_worker,
            "temperature": attacker.temperature,
        }
    )
    model = cfg.model.model_copy(update={"max_response_tokens": attacker.max_tokens})
    # The attacker never takes learner.lora's adapter: its workers receive whole weights.
    learner = cfg.learner.model_copy(update={"lora": cfg.learner.lora.model_copy(update={"enabled": False})})
    # A run directory of its own, so that disk weight sync never writes where the defender's workers read.
    attacker_cfg = cfg.model_copy(
        update={"rollout": rollout, "model": model, "learner": learner, "run_dir": str(Path(cfg.run_dir) / "attacker")}
    )
    return RolloutPool.from_config(
        attacker_cfg, attacker_path, name_prefix=name_prefix, env=actor_env(cfg.rollout.threads)
    )


def learner_startup_hint(learner: LearnerConfig) -> str:
    """What a learner that is not up may wait for, for the start-up timeout's message."""
    locks = build_locks.report()
    return (f"{locks} on the driver's node. " if locks else "") + (
        f"Raise learner.startup_timeout_s ({learner.startup_timeout_s:g}) if loading the models takes longer"
    )


class NotShared(RuntimeError):
    """Actors on another node than the driver's need a directory that node does not see."""


@ray.remote(num_cpus=0)
def _reads(path: str, text: str) -> bool:
    try:
        return Path(path).read_text() == text
    except OSError:
        return False


def check_shared_run_dir(cfg: Config, actors: Actors) -> str:
    """Refuse a run whose actors on other nodes than the driver's cannot read what the driver writes in run_dir:
    the learners write checkpoints there that the driver seals and resumes from, and a weight sync that declares
    `shared_filesystem` hands the workers files there. A task on each such node reads a file the driver wrote.
    Returns what was checked, for the log."""
    here = ray.get_runtime_context().get_node_id()
    needs: dict[str, list[str]] = {}
    for group in actors.learners:
        for rank in range(group.num_ranks):
            needs.setdefault(group.group.node_of(rank), []).append(group.names[rank])
    pools = [pool for pool in (actors.pool, actors.attacker_pool) if pool is not None]
    for pool in pools:
        if pool.weight_sync.shared_filesystem:
            for slot in range(pool.num_workers):
                needs.setdefault(pool.nodes[slot], []).append(pool.group.names[slot])
    others = {node: names for node, names in needs.items() if node != here}
    if not others:
        return f"every learner (and worker that reads run_dir) is on the driver's node {here}"
    marker = Path(cfg.run_dir) / f".shared-{uuid.uuid4().hex[:8]}"
    marker.write_text(marker.name)
    try:
        reads = ray.get(
            [
                _reads.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(
                    str(marker.resolve()), marker.name
                )
                for node in others
            ]
        )
    finally:
        marker.unlink()
    blind = [f"node {node} ({', '.join(names)})" for (node, names), ok in zip(others.items(), reads) if not ok]
    if blind:
        raise NotShared(
            f"run_dir {Path(cfg.run_dir).resolve()} is not shared with {'; '.join(blind)}: learners write there the "
            f"checkpoints that the driver (node {here}) seals and resumes from, and a weight sync that hands files "
            f"to the workers (rollout.weight_sync {cfg.rollout.weight_sync!r} "
            f"{'does' if actors.pool.weight_sync.shared_filesystem else 'does not'}) writes them there. Put run_dir "
            "on a filesystem every node mounts at the same path, or pin these actors to the driver's node "
            "(learner.resources, rollout.resources)"
        )
    return (
        f"run_dir is shared with node{'s' if len(others) > 1 else ''} {', '.join(others)}: a file the driver "
        "wrote there reads the same on each"
    )


def shutdown_actors(actors: Actors) -> None:
    actors.pool.shutdown()
    if actors.attacker_pool is not None:
        actors.attacker_pool.shutdown()
    for group in actors.learners:
        group.kill()
