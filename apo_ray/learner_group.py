"""LearnerGroup: one learner role (policy, reward, critic, ...) as N ranks in one placement group, called by the
driver as if it were one actor.

`group.sft_step.remote(...)` sends the call to every rank (the arguments put in the object store once) and
returns rank 0's ObjectRef, so anything that takes an actor handle (the weight syncs, the checkpointer) takes a
group. The ranks train data-parallel under DeepSpeed (actors/engine.py): each takes its share of the same
minibatches, and rank 0's result stands for all (its stats are averaged over the ranks). Collectives need every
rank in every call, the ZeRO-3 gathers for checkpoints and weight sync too, so every call goes to every rank,
except `rank_zero_methods` (a weight sync's send that rank 0 makes alone, as the NCCL broadcast into vLLM).

`gather(refs)` is `ray.get` for such calls: it also waits for the other ranks and stops at the first failure,
so that a rank that died raises `RankDied` naming it instead of leaving its peers waiting in a collective.
A generator method (the policy's `stream_weights`) hands out rank 0's ObjectRefGenerator; `gather` of one
waits until every rank's generator has finished and returns the refs rank 0 yielded.
The ranks meet at rank 0's node: its address and a free port are read there, in the placement group's first
bundle, before any rank starts (the ActorGroup's `on_placement_group`).
"""

from __future__ import annotations

import math
import socket
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import ray
from ray import ObjectRefGenerator
from ray.util.placement_group import PlacementGroup
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from apo_ray.actor_group import ActorGroup, wait_any
from apo_ray.actors.engine import Rendezvous
from apo_ray.deadlines import DeadlinePassed, learner_call_deadline_s


class RankDied(RuntimeError):
    """A rank of a learner group died (its process exited, was killed or lost its node)."""

    def __init__(self, group: str, name: str, rank: int, world_size: int, method: str, cause: BaseException):
        self.group, self.name, self.rank, self.world_size, self.method = group, name, rank, world_size, method
        first_line = next((line.strip() for line in str(cause).splitlines() if line.strip()), type(cause).__name__)
        super().__init__(
            f"{name}, rank {rank} of the {world_size}-rank {group} learner, died during {method}: {first_line}"
        )


@ray.remote(num_cpus=0)
def _node_address() -> tuple[str, int]:
    """This node's address and a port free on it, for torch.distributed's rendezvous at rank 0."""
    with socket.socket() as probe:
        probe.bind(("", 0))
        return ray.util.get_node_ip_address(), probe.getsockname()[1]


@dataclass
class _Call:
    """One fanned-out call: every rank's ref (of its generator's completion, for a generator method), rank 0's
    first; when it is due (time.monotonic()) and the seconds it was given."""

    group: LearnerGroup
    method: str
    refs: list[ray.ObjectRef]
    due: float = math.inf
    seconds: float = math.inf


@dataclass(frozen=True)
class _Pending:
    """One ref `gather` waits for: a rank's part of a group call, or (group None) a plain actor's or task's."""

    ref: ray.ObjectRef
    call: _Call | None = None
    rank: int = 0

    @property
    def due(self) -> float:
        return math.inf if self.call is None else self.call.due


# Calls whose rank-0 ref (or generator) has been handed out and not yet gathered, by that ref.
_IN_FLIGHT: dict[ray.ObjectRef | ObjectRefGenerator, _Call] = {}


def _done(ref: ray.ObjectRef | ObjectRefGenerator) -> ray.ObjectRef:
    """The ref that resolves once `ref`'s task has finished (a generator's, once it has yielded everything)."""
    return ref.completed() if isinstance(ref, ObjectRefGenerator) else ref


class _GroupMethod:
    def __init__(self, group: LearnerGroup, method: str):
        self.group, self.method = group, method

    def remote(self, *args: Any, **kwargs: Any) -> ray.ObjectRef | ObjectRefGenerator:
        return self.group.submit(self.method, *args, **kwargs)


class RenamedMethods:
    """A role that another learner group serves under its own method names, called as that role's group is:
    LoRA's reference is the policy learner reading its base weights with the adapter off
    (`token_logprobs` is the policy's `reference_token_logprobs`), not an actor of its own. Only the renamed
    methods exist: the group is the other role's to kill, time out and count."""

    def __init__(self, group: LearnerGroup, names: dict[str, str]):
        self.group, self.names = group, dict(names)

    def __getattr__(self, method: str) -> _GroupMethod:
        if method.startswith("_") or method not in self.names:
            raise AttributeError(
                f"{method}: this role is the {self.group.role} learner's {', '.join(self.names.values())}, nothing else"
            )
        return _GroupMethod(self.group, self.names[method])


class LearnerGroup:
    """`kwargs`: the constructor's keyword arguments, the same for every rank; `distributed` learners (the
    trained ones) also get `rendezvous=Rendezvous(rank, num_ranks, ...)`."""

    def __init__(
        self,
        actor_cls: type,
        num_ranks: int,
        *,
        role: str,
        name_prefix: str,
        kwargs: dict[str, Any],
        num_cpus_per_rank: float = 1.0,
        num_gpus_per_rank: float = 0.0,
        resources_per_rank: dict[str, float] | None = None,
        env: dict[str, str] | None = None,
        distributed: bool = True,
        rank_zero_methods: Sequence[str] = (),
        ready_timeout_s: float = 600.0,
        call_timeout_s: float | None = None,
    ):
        if num_ranks > 1 and not distributed:
            raise ValueError(f"{role}: {num_ranks} ranks of a learner that does not train together")
        self.role, self.num_ranks, self.kwargs = role, num_ranks, dict(kwargs)
        self.distributed, self.rank_zero_methods = distributed, frozenset(rank_zero_methods)
        self._master: tuple[str, int] | None = None
        self.call_timeout_s = call_timeout_s
        # When the last call submitted is due: a call's time counts from the end of the one queued before it.
        self._due = 0.0
        self.group = ActorGroup(
            actor_cls,
            num_ranks,
            name_prefix=name_prefix,
            make_kwargs=self._rank_kwargs,
            num_cpus_per_actor=num_cpus_per_rank,
            num_gpus_per_actor=num_gpus_per_rank,
            resources_per_actor=resources_per_rank,
            env=env,
            ready_timeout_s=ready_timeout_s,
            on_placement_group=self._find_master,
        )

    def _find_master(self, placement: PlacementGroup) -> None:
        if self.num_ranks > 1 and self._master is None:
            strategy = PlacementGroupSchedulingStrategy(placement_group=placement, placement_group_bundle_index=0)
            self._master = ray.get(_node_address.options(scheduling_strategy=strategy).remote())

    def _rank_kwargs(self, rank: int) -> dict[str, Any]:
        if not self.distributed:
            return dict(self.kwargs)
        addr, port = self._master or (None, None)
        return {**self.kwargs, "rendezvous": Rendezvous(rank, self.num_ranks, addr, port)}

    @property
    def ranks(self) -> list[ray.actor.ActorHandle]:
        return self.group.actors

    @property
    def names(self) -> list[str]:
        return self.group.names

    def __getattr__(self, method: str) -> _GroupMethod:
        # Only actor methods: private names (pickling, copying) are not calls.
        if method.startswith("_"):
            raise AttributeError(method)
        return _GroupMethod(self, method)

    def submit(self, method: str, /, *args: Any, **kwargs: Any) -> ray.ObjectRef | ObjectRefGenerator:
        """`method` on every rank (on rank 0 alone for `rank_zero_methods`); returns rank 0's ref (its
        generator, for a generator method)."""
        _settle_finished()
        due, seconds = self._schedule(args, kwargs)
        ranks = self.ranks[:1] if method in self.rank_zero_methods else self.ranks
        if len(ranks) > 1:
            # One copy in the object store for all ranks; Ray resolves top-level refs on each.
            args = tuple(a if isinstance(a, ray.ObjectRef) else ray.put(a) for a in args)
            kwargs = {k: v if isinstance(v, ray.ObjectRef) else ray.put(v) for k, v in kwargs.items()}
        results = [getattr(handle, method).remote(*args, **kwargs) for handle in ranks]
        _IN_FLIGHT[results[0]] = _Call(self, method, [_done(result) for result in results], due, seconds)
        return results[0]

    def _schedule(self, args: tuple, kwargs: dict) -> tuple[float, float]:
        """When a call of these arguments is due, and the seconds it gets: derived from its work (the learners'
        step methods take their samples first, and `epochs`), counted from when the call before it is due if that
        one is still running (the ranks take calls one at a time)."""
        samples = len(args[0]) if args and isinstance(args[0], (list, tuple)) else 0
        epochs = kwargs.get("epochs", 1)
        seconds = learner_call_deadline_s(samples, epochs if isinstance(epochs, int) else 1, self.call_timeout_s)
        queued = any(call.group is self for call in _IN_FLIGHT.values())
        self._due = (max(time.monotonic(), self._due) if queued else time.monotonic()) + seconds
        return self._due, seconds

    def deadline_passed(self, rank: int, method: str, seconds: float) -> DeadlinePassed:
        return DeadlinePassed(
            f"{self.names[rank]}, rank {rank} of the {self.num_ranks}-rank {self.role} learner, on node "
            f"{self.group.node_of(rank)},",
            method,
            seconds,
            "learner.call_timeout_s",
        )

    def call(self, method: str, /, *args: Any, **kwargs: Any) -> Any:
        """`method` on every rank, waited for; rank 0's result."""
        return gather(self.submit(method, *args, **kwargs))

    def call_all(self, method: str, /, *args: Any, **kwargs: Any) -> list[Any]:
        """`method` on every rank, waited for; every rank's result, in rank order."""
        call = _Call(
            self,
            method,
            [getattr(handle, method).remote(*args, **kwargs) for handle in self.ranks],
            *self._schedule(args, kwargs),
        )
        return _wait([_Pending(ref, call, rank) for rank, ref in enumerate(call.refs)])

    def rank_died(self, error: BaseException, rank: int, method: str) -> RankDied:
        return RankDied(self.role, self.names[rank], rank, self.num_ranks, method, error)

    def dead_rank(self, timeout_s: float = 5.0) -> RankDied | None:
        """The first rank found dead, or None: a rank that does not answer within `timeout_s` (busy, or
        waiting in a collective) is not counted as dead."""
        pings = [handle.__ray_ready__.remote() for handle in self.ranks]
        ready, _ = ray.wait(pings, num_returns=len(pings), timeout=timeout_s)
        for rank, ping in enumerate(pings):
            if ping in ready:
                try:
                    ray.get(ping)
                except ray.exceptions.RayActorError as error:
                    return self.rank_died(error, rank, "a health check")
        return None

    def kill(self) -> None:
        # Calls never waited for (a run stopped between submitting and collecting them) die with the group;
        # kept, they would fail the next run's first call in this process.
        for rank0, call in list(_IN_FLIGHT.items()):
            if call.group is self:
                del _IN_FLIGHT[rank0]
        self.group.kill()


def _wait(pending: list[_Pending]) -> list[Any]:
    """Results of `pending` in order, stopping at the first failure: a dead rank raises RankDied, a group call
    past its deadline DeadlinePassed, any other error is raised as ray.get raises it."""
    owners = {p.ref: p for p in pending}
    results: dict[ray.ObjectRef, Any] = {}
    waiting = {p.ref: p.due for p in pending}
    while waiting:
        ready, late = wait_any(waiting)
        for ref in ready:
            del waiting[ref]
            try:
                results[ref] = ray.get(ref)
            except ray.exceptions.RayActorError as error:
                call, rank = owners[ref].call, owners[ref].rank
                if call is None:
                    raise
                raise call.group.rank_died(error, rank, call.method) from error
        if late:
            call, rank = owners[late[0]].call, owners[late[0]].rank
            raise call.group.deadline_passed(rank, call.method, call.seconds)
    return [results[p.ref] for p in pending]


def gather(refs: ray.ObjectRef | ObjectRefGenerator | Iterable[ray.ObjectRef | ObjectRefGenerator]) -> Any:
    """`ray.get` that also waits for the other ranks of each group call among `refs` and stops at the first
    failure (RankDied for a dead rank, DeadlinePassed for a call past its deadline). Refs of plain actors and
    tasks are waited for as ray.get would. A generator's value is the list of the refs it yielded, once it (and
    each rank's) has finished."""
    single = isinstance(refs, (ray.ObjectRef, ObjectRefGenerator))
    wanted = [refs] if single else list(refs)
    distinct = list(dict.fromkeys(wanted))
    pending: list[_Pending] = []
    for ref in distinct:
        call = _IN_FLIGHT.pop(ref, None)
        if call is None:
            pending.append(_Pending(_done(ref)))
        else:
            pending += [_Pending(rank_ref, call, rank) for rank, rank_ref in enumerate(call.refs)]
    results = dict(zip([p.ref for p in pending], _wait(pending)))
    # A generator is read once, however often it was asked for.
    values = {ref: list(ref) if isinstance(ref, ObjectRefGenerator) else results[ref] for ref in distinct}
    return values[refs] if single else [values[ref] for ref in wanted]


def _settle_finished() -> None:
    """Forget group calls whose ranks have all finished (handed to ray.get elsewhere, e.g. a weight sync's
    state_dict); a rank of one that died raises RankDied here, before the next call waits on it."""
    for rank0, call in list(_IN_FLIGHT.items()):
        done, _ = ray.wait(call.refs, num_returns=len(call.refs), timeout=0)
        if len(done) == len(call.refs):
            del _IN_FLIGHT[rank0]
            _wait([_Pending(ref, call, rank) for rank, ref in enumerate(call.refs)])


def find_dead_rank(groups: Iterable[Any]) -> RankDied | None:
    """The first dead rank of any LearnerGroup among `groups`, or None."""
    for group in groups:
        if isinstance(group, LearnerGroup) and (dead := group.dead_rank()) is not None:
            return dead
    return None
