"""The placement plan: which actors a config starts, the CPUs and GPUs of each one's bundle, and whether a
cluster can hold them.

`actor_plan` is the one source of these numbers: apo_ray.cluster asks Ray for exactly them when it starts the
actors, and `apo-ray train --dry-run` prints them and packs them onto a cluster (the running one, or one
described with `--cluster`) without starting anything.

Packing follows Ray's rules for the bundles apo-ray makes: every actor sits in a bundle of its own, a bundle
lies on one node, a GPU share below 1 is a share of one GPU (two 0.5 fit on a GPU, 0.75 and 0.5 do not), and a
share of 1 or more must be a whole number of GPUs. Bundles are placed largest first on the first node with
room, a heuristic: Ray's scheduler may find a packing this misses in contrived cases, never one the totals
forbid.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field

from apo_ray.config import RAY_BUILTIN_RESOURCES, Config, ConfigError

EPS = 1e-9


@dataclass(frozen=True)
class Role:
    """`count` actors of one role, each in a bundle of `cpus` CPUs and `gpus` GPUs."""

    name: str
    count: int
    unit: str  # "rank" (a learner process) or "worker" (a rollout engine)
    cpus: float
    gpus: float
    # The config keys that set this role's bundle, and the one that sets its GPUs, for messages.
    keys: str
    gpu_key: str
    # Threads each actor computes on (learner.threads, rollout.threads); None: Ray's, from `cpus`.
    threads: int | None = None
    # Custom Ray resources of each bundle (learner.resources, rollout.resources): they pin the role to the nodes
    # that have them.
    resources: dict[str, float] = field(default_factory=dict)


def actor_plan(cfg: Config) -> list[Role]:
    """Every actor start_actors makes for `cfg`, in start order."""
    learner, rollout = cfg.learner, cfg.rollout

    def trained(role: str) -> tuple:
        return (
            "rank",
            learner.num_cpus,
            learner.num_gpus,
            f"learner.num_ranks or learner.{role}_ranks, learner.num_cpus, learner.num_gpus",
            "learner.num_gpus",
            learner.threads,
            learner.resources,
        )

    # Frozen models (no optimizer state, no gradients) take half a learner's GPU share.
    frozen = (
        "rank",
        0.5,
        learner.num_gpus / 2,
        "half of learner.num_gpus",
        "learner.num_gpus",
        learner.threads,
        learner.resources,
    )
    # The game's trained learners are learner.num_ranks (or its per-role override) ranks; the frozen ones, AAPA's
    # discriminator and APL's attacker are one process each.
    ranks = cfg.trained_ranks
    roles = [Role("policy", ranks["policy"], *trained("policy")), Role("reward", ranks["reward"], *trained("reward"))]
    if not learner.lora.shared_reference:
        # Under LoRA the policy learner is its own reference (its base weights, the adapter off).
        roles.append(Role("reference", 1, *frozen))
    if cfg.model.eval_reward != "gold":
        roles.append(Role("eval_reward", 1, *frozen))
    if "critic" in ranks:
        roles.append(Role("critic", ranks["critic"], *trained("critic")))
    if cfg.aapa.enabled:
        # Frozen once fitted; its fit in round 0 is a short RM-sized job.
        roles.append(Role("discriminator", 1, *frozen))
    # The most workers the run will hold at once (rollout.schedule may grow the pool).
    roles.append(
        Role(
            "rollout",
            rollout.peak_workers,
            "worker",
            rollout.num_cpus_per_worker,
            rollout.num_gpus_per_worker,
            "rollout.num_workers, rollout.schedule, rollout.num_cpus_per_worker, rollout.num_gpus_per_worker",
            "rollout.num_gpus_per_worker",
            rollout.threads,
            rollout.resources,
        )
    )
    if cfg.apl.enabled:
        attacker = cfg.apl.attacker
        roles.append(
            Role(
                "attacker",
                1,
                "rank",
                attacker.num_cpus,
                attacker.num_gpus,
                "apl.attacker.num_cpus, apl.attacker.num_gpus",
                "apl.attacker.num_gpus",
                learner.threads,
                learner.resources,
            )
        )
        roles.append(
            Role(
                "attacker_rollout",
                attacker.rollout_workers,
                "worker",
                attacker.rollout_num_cpus_per_worker,
                attacker.rollout_num_gpus_per_worker,
                "apl.attacker.rollout_workers, apl.attacker.rollout_num_cpus_per_worker, "
                "apl.attacker.rollout_num_gpus_per_worker",
                "apl.attacker.rollout_num_gpus_per_worker",
                rollout.threads,
                rollout.resources,
            )
        )
    return roles


def totals(plan: list[Role]) -> dict[str, float]:
    return {"CPU": sum(r.count * r.cpus for r in plan), "GPU": sum(r.count * r.gpus for r in plan)}


def check_plan(plan: list[Role]) -> None:
    """Bundles Ray would refuse outright: a GPU share above 1 that is not a whole number."""
    for role in plan:
        if role.gpus > 1 and abs(role.gpus - round(role.gpus)) > EPS:
            raise ConfigError(
                f"{role.gpu_key}: {role.name} would get {role.gpus:g} GPUs ({role.keys}); Ray takes a share of "
                "one GPU (below 1) or whole GPUs"
            )


# ---------------------------------------------------------------------------------------------- clusters


@dataclass(frozen=True)
class Node:
    name: str
    gpus: int
    # None: not given, not checked (a described cluster that names only its GPUs).
    cpus: float | None
    # Its custom Ray resources (`ray start --resources`); None: not given, not checked (a described cluster).
    resources: dict[str, float] | None = None

    def custom_text(self) -> str:
        return "".join(f", {amount:g} {name}" for name, amount in sorted((self.resources or {}).items()))


@dataclass(frozen=True)
class Cluster:
    nodes: tuple[Node, ...]
    # Where the description came from, for the printout.
    source: str

    def describe(self) -> str:
        sizes = {(n.gpus, n.cpus, n.custom_text()) for n in self.nodes}
        if len(sizes) == 1:
            gpus, cpus, custom = next(iter(sizes))
            cpu_text = "CPUs not checked" if cpus is None else f"{cpus:g} CPU"
            count = len(self.nodes)
            return f"{count} node{'s' if count > 1 else ''} x {gpus} GPU, {cpu_text}{custom} each"
        return ", ".join(
            f"{n.name}: {n.gpus} GPU, {'?' if n.cpus is None else f'{n.cpus:g}'} CPU{n.custom_text()}"
            for n in self.nodes
        )


CLUSTER_SYNTAX = (
    "`2x8gpu`, `2x8gpu,64cpu`, `8gpu`, `4cpu`, or `nodes=2,gpus_per_node=8,cpus_per_node=64` "
    "(N nodes alike; CPUs per node unchecked when not given)"
)


def _compact_item(item: str) -> dict[str, str] | None:
    """`2x8gpu` -> nodes 2, gpus_per_node 8; `8gpu` -> gpus_per_node 8; `64cpu` -> cpus_per_node 64."""
    text = item.replace(" ", "")
    if match := re.fullmatch(r"(?:(\d+)x)?(\d+)gpus?", text):
        return {key: value for key, value in zip(("nodes", "gpus_per_node"), match.groups()) if value is not None}
    if match := re.fullmatch(r"(\d+(?:\.\d+)?)cpus?", text):
        return {"cpus_per_node": match[1]}
    return None


def parse_cluster(spec: str) -> Cluster:
    """A described cluster: `2x8gpu,64cpu` or `nodes=2,gpus_per_node=8,cpus_per_node=64`."""
    values: dict[str, float] = {}

    def fail(why: str) -> ConfigError:
        return ConfigError(f"--cluster {spec!r}: {why}; write it as {CLUSTER_SYNTAX}")

    for item in filter(None, (part.strip().lower() for part in spec.split(","))):
        if "=" in item:
            key, _, raw = (part.strip() for part in item.partition("="))
            if key not in ("nodes", "gpus_per_node", "cpus_per_node"):
                raise fail(f"unknown key {key!r}")
            given = {key: raw}
        elif (given := _compact_item(item)) is None:
            raise fail(f"cannot read {item!r}")
        for key, raw in given.items():
            if key in values:
                raise fail(f"{key} given twice")
            try:
                values[key] = float(raw)
            except ValueError:
                values[key] = math.nan
            if not math.isfinite(values[key]):
                raise fail(f"{key} must be a number, got {raw!r}")
    if not values:
        raise fail("empty")
    nodes, gpus, cpus = values.get("nodes", 1.0), values.get("gpus_per_node", 0.0), values.get("cpus_per_node")
    for key, value, least in (("nodes", nodes, 1), ("gpus_per_node", gpus, 0)):
        if value != int(value) or value < least:
            raise fail(f"{key} must be a whole number >= {least}, got {value:g}")
    if cpus is not None and cpus <= 0:
        raise fail(f"cpus_per_node must be > 0, got {cpus:g}")
    return Cluster(tuple(Node(f"node {i}", int(gpus), cpus) for i in range(int(nodes))), f"--cluster {spec}")


def local_num_cpus(cfg: Config) -> int:
    """Logical CPUs of the local cluster init_ray starts: ray.num_cpus, else the cores or what the plan
    needs, whichever is more (a 2-core machine still runs policy, RM, reference and a rollout worker)."""
    need = totals(actor_plan(cfg))["CPU"]
    return cfg.ray.num_cpus or max(os.cpu_count() or 1, math.ceil(need - EPS))


def local_cluster(cfg: Config) -> Cluster:
    """The one-node cluster init_ray would start here; GPUs as CUDA sees them (Ray counts the same)."""
    import torch

    return Cluster(
        (Node("this machine", torch.cuda.device_count(), float(local_num_cpus(cfg)), {}),),
        "the local Ray cluster `apo-ray train` would start on this machine",
    )


def custom_resources(resources: dict[str, float]) -> dict[str, float]:
    """A Ray node's resources less Ray's own: CPU, GPU, memory and the ones Ray names after the node
    (`node:<ip>`, `accelerator_type:...`)."""
    return {
        name: amount
        for name, amount in resources.items()
        if name not in RAY_BUILTIN_RESOURCES and not name.startswith(("node:", "accelerator_type:"))
    }


def cluster_from_ray_nodes(nodes: list[dict], source: str) -> Cluster:
    """A running cluster's alive nodes, from `ray.nodes()`; their total resources, not what is free now."""
    alive = [n for n in nodes if n.get("Alive")]
    return Cluster(
        tuple(
            Node(
                f"{n.get('NodeManagerAddress', 'node')} ({n.get('NodeID', '')[:8]})",
                int(n.get("Resources", {}).get("GPU", 0)),
                float(n.get("Resources", {}).get("CPU", 0)),
                custom_resources(n.get("Resources", {})),
            )
            for n in alive
        ),
        source,
    )


def read_running_cluster(address: str) -> Cluster:
    """Join the cluster at `address` just long enough to read its nodes."""
    import ray

    try:
        ray.init(address=address, log_to_driver=False)
    except Exception as exc:  # unreachable, refused, no auth token: Ray raises several types
        raise ConfigError(
            f"ray.address / RAY_ADDRESS {address!r}: cannot join that Ray cluster to read its nodes "
            f"({type(exc).__name__}: {exc}); or describe it with --cluster"
        ) from exc
    try:
        return cluster_from_ray_nodes(ray.nodes(), f"the running Ray cluster at {address}")
    finally:
        ray.shutdown()


# ---------------------------------------------------------------------------------------------- packing


@dataclass
class _NodeRoom:
    node: Node
    cpus: float | None
    gpus: list[float]  # free share of each GPU
    custom: dict[str, float] | None  # None: not checked
    placed: list[tuple[str, int]] = field(default_factory=list)

    def take(self, cpus: float, gpus: float, custom: dict[str, float]) -> bool:
        if self.cpus is not None and cpus > self.cpus + EPS:
            return False
        if self.custom is not None and any(
            amount > self.custom.get(name, 0.0) + EPS for name, amount in custom.items()
        ):
            return False
        if gpus >= 1 - EPS:
            whole = [i for i, free in enumerate(self.gpus) if free >= 1 - EPS]
            if len(whole) < round(gpus):
                return False
            for i in whole[: round(gpus)]:
                self.gpus[i] = 0.0
        elif gpus > EPS:
            # Best fit: the fullest GPU with room for the share, so that shares do not spread over many GPUs.
            fitting = [i for i, free in enumerate(self.gpus) if free >= gpus - EPS]
            if not fitting:
                return False
            self.gpus[min(fitting, key=lambda i: self.gpus[i])] -= gpus
        if self.cpus is not None:
            self.cpus -= cpus
        for name, amount in custom.items() if self.custom is not None else ():
            self.custom[name] -= amount
        return True


@dataclass(frozen=True)
class Placement:
    cluster: Cluster
    # Per node: the (role, index) of the bundles placed there, the CPUs (None: unchecked) and GPUs left.
    assigned: tuple[tuple[Node, tuple[tuple[str, int], ...], float | None, float], ...]
    # (role, index) of every bundle no node could take.
    unplaced: tuple[tuple[str, int], ...]
    # One line per role left out (what it needs, why no node takes it), then per resource the plan lacks.
    shortfall: tuple[str, ...]
    # The same in one line: which roles, how much of which resource.
    summary: str

    @property
    def fits(self) -> bool:
        return not self.unplaced


def place(plan: list[Role], cluster: Cluster) -> Placement:
    rooms = [
        _NodeRoom(n, n.cpus, [1.0] * n.gpus, None if n.resources is None else dict(n.resources)) for n in cluster.nodes
    ]
    roles = {r.name: r for r in plan}
    bundles = [(r.name, i) for r in plan for i in range(r.count)]
    # Largest first: GPUs are the scarce resource, and whole GPUs before shares keeps shares from splitting them.
    bundles.sort(key=lambda b: (-roles[b[0]].gpus, -roles[b[0]].cpus))
    unplaced = []
    for name, index in bundles:
        role = roles[name]
        room = next((room for room in rooms if room.take(role.cpus, role.gpus, role.resources)), None)
        if room is None:
            unplaced.append((name, index))
        else:
            room.placed.append((name, index))
    order = {name: i for i, name in enumerate(roles)}
    assigned = tuple(
        (room.node, tuple(sorted(room.placed, key=lambda b: (order[b[0]], b[1]))), room.cpus, sum(room.gpus))
        for room in rooms
    )
    unplaced.sort(key=lambda b: (order[b[0]], b[1]))
    shortfall, summary = _shortfall(plan, cluster, unplaced) if unplaced else ((), "")
    return Placement(cluster, assigned, tuple(unplaced), shortfall, summary)


def _why_not(role: Role, cluster: Cluster) -> str:
    for name, amount in role.resources.items():
        if not any(n.resources is None or n.resources.get(name, 0.0) >= amount - EPS for n in cluster.nodes):
            return f"a bundle lies on one node, and no node has {amount:g} of the custom resource {name!r}"
    biggest_gpus = max((n.gpus for n in cluster.nodes), default=0)
    node_cpus = [n.cpus for n in cluster.nodes]
    if role.gpus > biggest_gpus + EPS:
        return f"a bundle lies on one node, and the largest node has {biggest_gpus} GPU"
    if None not in node_cpus and role.cpus > max(node_cpus, default=0) + EPS:
        return f"a bundle lies on one node, and the largest node has {max(node_cpus):g} CPU"
    return "no node has that much left after the bundles placed before it"


def _shortfall(plan: list[Role], cluster: Cluster, unplaced: list[tuple[str, int]]) -> tuple[tuple[str, ...], str]:
    need = totals(plan)
    have = {
        "GPU": float(sum(n.gpus for n in cluster.nodes)),
        "CPU": None if any(n.cpus is None for n in cluster.nodes) else sum(n.cpus for n in cluster.nodes),
    }
    lines, left_out = [], []
    for role in plan:
        left = sum(1 for name, _ in unplaced if name == role.name)
        if not left:
            continue
        which = f"{left} of {role.count} {role.unit}s" if role.count > 1 else f"its {role.unit}"
        lines.append(
            f"{role.name}: {which} ({role.cpus:g} CPU + {role.gpus:g} GPU each; set by {role.keys}) "
            f"cannot be placed: {_why_not(role, cluster)}"
        )
        left_out.append(role.name if role.count == 1 else f"{left} of {role.count} {role.name} {role.unit}s")
    short = []
    for kind in ("GPU", "CPU"):
        if have[kind] is not None and need[kind] > have[kind] + EPS:
            lines.append(
                f"{kind}: the plan needs {need[kind]:g}, the cluster has {have[kind]:g} "
                f"(short by {need[kind] - have[kind]:g})"
            )
            short.append(f"{need[kind] - have[kind]:g} {kind}")
    summary = f"no place for {', '.join(left_out)} on {cluster.describe()}"
    if short:
        summary += f"; short by {' and '.join(short)}"
    return tuple(lines), summary


# ---------------------------------------------------------------------------------------------- printing


def plan_table(plan: list[Role]) -> list[str]:
    """The plan as fixed-width rows; the configs' headers carry these rows verbatim (tests check it)."""
    rows = [("role", "actors", "CPU each", "GPU each", "CPU", "GPU")]
    for r in plan:
        rows.append(
            (
                r.name,
                f"{r.count} {r.unit}{'s' if r.count > 1 else ''}",
                f"{r.cpus:g}",
                f"{r.gpus:g}",
                f"{r.count * r.cpus:g}",
                f"{r.count * r.gpus:g}",
            )
        )
    total = totals(plan)
    rows.append(("total", f"{sum(r.count for r in plan)} bundles", "", "", f"{total['CPU']:g}", f"{total['GPU']:g}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))).rstrip()
        for row in rows
    ]


def _ranges(indices: list[int]) -> str:
    spans, start = [], None
    for i, index in enumerate(indices):
        if start is None:
            start = index
        if i + 1 == len(indices) or indices[i + 1] != index + 1:
            spans.append(f"{start}" if start == index else f"{start}-{index}")
            start = None
    return ",".join(spans)


def placement_lines(placement: Placement, plan: list[Role]) -> list[str]:
    counts = {r.name: r.count for r in plan}
    lines = [f"cluster: {placement.cluster.describe()} ({placement.cluster.source})"]
    for node, bundles, cpus_left, gpus_left in placement.assigned:
        by_role: dict[str, list[int]] = {}
        for name, index in bundles:
            by_role.setdefault(name, []).append(index)
        names = [name if counts[name] == 1 else f"{name} {_ranges(indices)}" for name, indices in by_role.items()]
        used_gpu = node.gpus - gpus_left
        cpu_text = "" if node.cpus is None else f", {node.cpus - cpus_left:g}/{node.cpus:g} CPU"
        lines.append(f"  {node.name}: {used_gpu:g}/{node.gpus} GPU{cpu_text}: {', '.join(names) or 'nothing'}")
    if placement.fits:
        lines.append("fits: every bundle has a place")
    else:
        lines.append("does not fit:")
        lines += [f"  {line}" for line in placement.shortfall]
    return lines
