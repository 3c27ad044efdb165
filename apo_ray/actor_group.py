"""ActorGroup: N actors of one class, each in its own bundle of a placement group, named for the dashboard.

Like OpenRLHF's RayActorGroup, plus what an elastic rollout pool needs: restart one member in its own
bundle, and grow or shrink the group. A placement group's size is fixed: shrinking frees bundles (and
removes a placement group once none of its members is left), growing fills freed bundles first and puts
the rest in a new placement group. `wait_until_ready` bounds how long members may take to come up.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


class ActorStartupTimeout(TimeoutError):
    """Actors whose constructor had not returned when their start-up time was up."""


@dataclass
class _Member:
    handle: ray.actor.ActorHandle
    name: str
    group: PlacementGroup
    bundle_index: int
    started: float  # time.monotonic() when it was asked to start


class ActorGroup:
    """`make_kwargs(index)` gives the constructor keyword arguments of member `index` (also on restart).
    `on_placement_group(group)` runs on each new placement group once it is ready, before any member starts
    in it (a learner group finds its rank 0's address there)."""

    def __init__(
        self,
        actor_cls: type,
        num_actors: int,
        *,
        name_prefix: str,
        make_kwargs: Callable[[int], dict[str, Any]] = lambda index: {},
        num_cpus_per_actor: float = 1.0,
        num_gpus_per_actor: float = 0.0,
        resources_per_actor: dict[str, float] | None = None,
        placement_strategy: str = "PACK",
        env: dict[str, str] | None = None,
        ready_timeout_s: float = 600.0,
        on_placement_group: Callable[[PlacementGroup], None] = lambda group: None,
    ):
        if num_actors < 1:
            raise ValueError(f"num_actors: must be >= 1, got {num_actors}")
        if placement_strategy not in PLACEMENT_STRATEGIES:
            raise ValueError(
                f"placement_strategy: must be one of {', '.join(PLACEMENT_STRATEGIES)}; got {placement_strategy!r}"
            )
        self._remote_cls = actor_cls if hasattr(actor_cls, "remote") else ray.remote(actor_cls)
        self.name_prefix = name_prefix
        self.make_kwargs = make_kwargs
        self.num_cpus, self.num_gpus = num_cpus_per_actor, num_gpus_per_actor
        # Custom resources go in the bundle alone: the actor takes them with the bundle it is scheduled in.
        self.resources = dict(resources_per_actor or {})
        self.placement_strategy = placement_strategy
        self.env = dict(env or {})
        self.ready_timeout_s = ready_timeout_s
        self.on_placement_group = on_placement_group
        self.restarts = 0
        self._members: list[_Member] = []
        self._free_bundles: list[tuple[PlacementGroup, int]] = []
        self._incarnations: dict[int, int] = {}
        self._grow(num_actors)

    # ------------------------------------------------------------------ members

    @property
    def actors(self) -> list[ray.actor.ActorHandle]:
        return [m.handle for m in self._members]

    @property
    def names(self) -> list[str]:
        return [m.name for m in self._members]

    def node_of(self, index: int) -> str:
        """The Ray node id of member `index`'s bundle: Ray knows it whether or not the member answers."""
        member = self._members[index]
        return ray.util.placement_group_table(member.group)["bundles_to_node_id"].get(member.bundle_index, "unknown")

    def __len__(self) -> int:
        return len(self._members)

    def _bundle(self) -> dict[str, float]:
        bundle = {"CPU": self.num_cpus, **self.resources}
        if self.num_gpus:
            bundle["GPU"] = self.num_gpus
        return bundle

    def _name(self, index: int) -> str:
        # A killed actor's name stays registered for a moment, so a replacement gets a name of its own.
        incarnation = self._incarnations.get(index, 0)
        self._incarnations[index] = incarnation + 1
        return f"{self.name_prefix}-{index}" if incarnation == 0 else f"{self.name_prefix}-{index}.{incarnation}"

    def _start(self, index: int, group: PlacementGroup, bundle_index: int) -> _Member:
        name = self._name(index)
        options: dict[str, Any] = {
            "name": name,
            "num_cpus": self.num_cpus,
            "num_gpus": self.num_gpus,
            "scheduling_strategy": PlacementGroupSchedulingStrategy(
                placement_group=group, placement_group_bundle_index=bundle_index
            ),
        }
        if self.env:
            options["runtime_env"] = {"env_vars": self.env}
        handle = self._remote_cls.options(**options).remote(**self.make_kwargs(index))
        return _Member(handle, name, group, bundle_index, time.monotonic())

    def _new_bundles(self, count: int) -> list[tuple[PlacementGroup, int]]:
        group = placement_group([self._bundle() for _ in range(count)], strategy=self.placement_strategy)
        try:
            ray.get(group.ready(), timeout=self.ready_timeout_s)
        except ray.exceptions.GetTimeoutError as error:
            remove_placement_group(group)
            raise RuntimeError(
                f"{self.name_prefix}: the cluster cannot place {count} more actors with {self._bundle()} each "
                f"(available: {ray.available_resources()})"
            ) from error
        self.on_placement_group(group)
        return [(group, bundle_index) for bundle_index in range(count)]

    def _grow(self, count: int) -> None:
        reused = [self._free_bundles.pop() for _ in range(min(count, len(self._free_bundles)))]
        slots = reused + (self._new_bundles(count - len(reused)) if count > len(reused) else [])
        try:
            while slots:
                group, bundle_index = slots[0]
                self._members.append(self._start(len(self._members), group, bundle_index))
                slots.pop(0)
        finally:
            # A start that raised leaves its bundle and the ones after it to the next resize (and to kill).
            self._free_bundles.extend(slots)

    def _shrink(self, count: int) -> None:
        for _ in range(count):
            self.remove(len(self._members) - 1)

    def remove(self, index: int) -> None:
        """Take member `index` out (the ones after it move down one): its bundle is kept for a later grow while
        another member holds its placement group, else the group is removed. Ray places again a bundle whose node
        died once a node with room joins, so a grow puts its member there."""
        member = self._members.pop(index)
        ray.kill(member.handle)
        if any(m.group.id == member.group.id for m in self._members):
            self._free_bundles.append((member.group, member.bundle_index))
        else:
            self._free_bundles = [(g, i) for g, i in self._free_bundles if g.id != member.group.id]
            remove_placement_group(member.group)

    def resize(self, num_actors: int) -> list[int]:
        """Grow or shrink to `num_actors`; returns the indices of members that were added."""
        if num_actors < 1:
            raise ValueError(f"num_actors: must be >= 1, got {num_actors}")
        current = len(self._members)
        if num_actors > current:
            self._grow(num_actors - current)
        elif num_actors < current:
            self._shrink(current - num_actors)
        return list(range(current, num_actors))

    def restart(self, index: int) -> ray.actor.ActorHandle:
        """Replace member `index` (dead or not) by a fresh actor in the same bundle."""
        old = self._members[index]
        ray.kill(old.handle, no_restart=True)
        self.restarts += 1
        self._members[index] = self._start(index, old.group, old.bundle_index)
        return self._members[index].handle

    def kill(self) -> None:
        """Kill every member and remove the placement groups."""
        groups = {group.id: group for group in [m.group for m in self._members] + [g for g, _ in self._free_bundles]}
        for member in self._members:
            ray.kill(member.handle)
        for group in groups.values():
            remove_placement_group(group)
        self._members, self._free_bundles = [], []

    # ------------------------------------------------------------------ calls

    def call(self, method: str, /, *args: Any, **kwargs: Any) -> list[Any]:
        """`method(*args, **kwargs)` on every member, waited for; results in member order."""
        return ray.get([getattr(handle, method).remote(*args, **kwargs) for handle in self.actors])


def wait_any(deadlines: dict[ray.ObjectRef, float]) -> tuple[list[ray.ObjectRef], list[ray.ObjectRef]]:
    """Wait until one of the refs is ready or the earliest of their deadlines (time.monotonic()) passes; returns
    the refs that are ready and those not ready past their deadline. The caller names what it waited for."""
    earliest = min(deadlines.values())
    timeout = None if earliest == math.inf else max(0.0, earliest - time.monotonic())
    ready, _ = ray.wait(list(deadlines), num_returns=1, timeout=timeout)
    now = time.monotonic()
    return ready, [ref for ref, deadline in deadlines.items() if deadline <= now and ref not in ready]


def wait_until_ready(
    groups: Iterable[ActorGroup],
    timeout_s: float,
    *,
    diagnose: Callable[[], str] = lambda: "",
) -> None:
    """Wait until every member of `groups` has finished its constructor, at most `timeout_s` seconds after
    it was started.

    A constructor that raised raises here (Ray's actor error, with its cause). Members still constructing
    past their time raise ActorStartupTimeout naming them, followed by `diagnose()`: what they may wait for.
    """
    pending = {m.handle.__ray_ready__.remote(): m for group in groups for m in group._members}
    while pending:
        first_deadline = min(m.started for m in pending.values()) + timeout_s
        # One at a time, so that a constructor that failed is reported as soon as it fails.
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=max(0.0, first_deadline - time.monotonic()))
        if ready:
            pending.pop(ready[0])
            ray.get(ready[0])
            continue
        late = [m.name for m in pending.values() if m.started + timeout_s <= time.monotonic()]
        if not late:  # ray.wait returned a moment early
            continue
        hint = diagnose()
        raise ActorStartupTimeout(
            f"{', '.join(late)}: not up {timeout_s:g} s after starting (the constructor has not returned)"
            + (f"; {hint}" if hint else "")
        )
