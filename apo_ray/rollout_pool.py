"""RolloutPool: N rollout workers that sample as one, survive a worker's death, and resize between rounds.

- `generate` splits the prompts into contiguous, balanced shards (one per worker) and returns the
  rollouts in prompt order. If a worker dies mid-call, its shard is split over the surviving workers and
  the dead worker is restarted in its placement-group bundle with the current weights: every prompt is
  answered exactly once. A worker whose node died is not restarted (its bundle has no node until one with
  room joins): the pool names it and its node, re-runs its prompts on the workers left and goes on without it;
  `resize` grows it again, and with no worker left the call raises WorkersLost. `submit` starts the same call
  and returns at once (`GenerateCall.result()` collects it), so that the workers sample while the driver waits
  on learners.
- `sync` / `sync_from` move new weights to every worker through a weight-sync backend (apo_ray/sync_backends/);
  the pool keeps the last payload so that workers that join (resize) or restart get the current weights and
  version. After every load each worker reports a fingerprint of what its engine holds (apo_ray/fingerprint.py),
  which must equal the learner's, or the sync raises WeightsDiffer naming the worker and the tensor. After a LoRA
  adapter's sync (the base weights unchanged) each worker's log-probs of a probe sample must equal the learner's
  instead.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import torch

from apo_ray.actor_group import ActorGroup, wait_any, wait_until_ready
from apo_ray.actors.rollout import RolloutWorker
from apo_ray.chat import template_setting
from apo_ray.config import Config, check_rollout_settings
from apo_ray.deadlines import DeadlinePassed, generate_deadline_s, startup_deadline_s, sync_deadline_s
from apo_ray.fingerprint import Fingerprint, fingerprint, first_difference
from apo_ray.game import Rollout, TokenSample, WeightsDiffer, assign_shards
from apo_ray.learner_group import gather
from apo_ray.lora import probe_effect, probe_mismatch
from apo_ray.named_tensors import as_named_tensors, checkpoint_bytes, read_checkpoint_dir
from apo_ray.progress import Progress
from apo_ray.sync_backends import SyncBackend, SyncStats, cluster_refusal, config_refusal, make_backend, policy_backend

log = logging.getLogger(__name__)

GENERATE_KEY, SYNC_KEY = "rollout.generate_timeout_s", "rollout.sync_timeout_s"


class WorkersLost(RuntimeError):
    """Every rollout worker of the pool was lost with its node: nothing is left to sample on."""


def dead_nodes() -> set[str]:
    """The Ray node ids that the cluster has marked dead."""
    return {node["NodeID"] for node in ray.nodes() if not node.get("Alive")}


@dataclass(frozen=True)
class RolloutWorkerSpec:
    """Everything a RolloutWorker is built from, except its index."""

    model_path: str
    backend: str = "vllm"
    max_new_tokens: int = 32
    max_prompt_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    max_model_len: int = 128
    dtype: str = "auto"
    engine_kwargs: dict[str, Any] = field(default_factory=dict)
    # "auto", "none" or a template's text (apo_ray.chat.template_setting).
    chat_template: str = "auto"
    # The rank of the LoRA adapters an adapter-only sync sends (0: syncs send whole weights).
    lora_rank: int = 0

    def __post_init__(self) -> None:
        check_rollout_settings(
            self.backend, self.max_prompt_tokens, self.max_new_tokens, self.max_model_len, self.engine_kwargs
        )

    def worker_kwargs(self, worker_index: int) -> dict[str, Any]:
        kwargs = dataclasses.asdict(self)
        # Distinct engine seeds, so unseeded calls do not draw the same samples on every worker.
        kwargs["seed"] = self.seed + worker_index
        return {**kwargs, "worker_index": worker_index}


class GenerateCall:
    """One `RolloutPool.submit`: the prompts' shards are with the workers; `result()` waits for them.

    Each worker's shard may be split into `pieces_per_worker` contiguous pieces, queued on the worker one
    after another, so that a caller can use the first pieces (`poll` or `result`'s `on_piece`) while the
    worker samples the rest. If a worker dies, or a piece is not back by its deadline (the worker stalls), its
    piece is split over the other workers and the worker is replaced in its placement-group bundle with the
    current weights: every prompt is answered exactly once. A piece's deadline counts from the end of the one
    queued before it on its worker (apo_ray/deadlines.py). `stats` holds the call's throughput once it is
    collected."""

    def __init__(self, pool: RolloutPool, prompts: Sequence[str], n: int, seed: int | None, pieces_per_worker: int = 1):
        if pieces_per_worker < 1:
            raise ValueError(f"pieces_per_worker: must be >= 1, got {pieces_per_worker}")
        self.pool, self.prompts, self.n, self.seed = pool, list(prompts), n, seed
        self.num_workers = pool.num_workers
        self.stats: dict[str, float] = {}
        self._started = time.perf_counter()
        self._in_flight: dict[ray.ObjectRef, tuple[int, ray.actor.ActorHandle, list[int], float]] = {}
        # Per worker, when the last piece queued on it is due.
        self._due: dict[int, float] = {}
        self._answered: dict[int, list[Rollout]] = {}
        self._restarted: set[int] = set()
        self._failures = 0
        self._lost = 0
        for worker, shard in enumerate(assign_shards(len(self.prompts), self.num_workers)):
            for piece in assign_shards(len(shard), pieces_per_worker):  # _submit skips the empty ones
                self._submit(worker, [shard[i] for i in piece])

    def _submit(self, worker: int, indices: list[int]) -> None:
        if indices:
            handle = self.pool.group.actors[worker]
            ref = handle.generate.remote([self.prompts[i] for i in indices], indices, self.n, self.seed)
            self._due[worker] = max(time.monotonic(), self._due.get(worker, 0.0)) + self._piece_seconds(indices)
            self._in_flight[ref] = (worker, handle, indices, self._due[worker])

    def poll(self, on_piece: Callable[[list[Rollout]], None] | None) -> None:
        """Hand every piece that is already sampled to `on_piece`, without waiting for the others."""
        if not self._in_flight:
            return
        done, _ = ray.wait(list(self._in_flight), num_returns=len(self._in_flight), timeout=0)
        for ref in done:
            self._take(ref, on_piece)

    def result(self, on_piece: Callable[[list[Rollout]], None] | None = None) -> list[Rollout]:
        """Every rollout, in prompt order; `on_piece` sees each piece not yet polled as it arrives."""
        pool, prompts, n = self.pool, self.prompts, self.n
        try:
            # What was sampled while the caller did other work is taken first, so that the progress line tells it
            # from what the caller waited for. Samples, not prompts: a shard retried after a worker's death counts
            # once, when it is answered.
            self.poll(on_piece)
            ready = sum(len(rollouts) for rollouts in self._answered.values())
            with Progress("generate", total=n * len(prompts), unit="samples", ready=ready) as progress:
                while self._in_flight:
                    ready, late = wait_any({ref: piece[3] for ref, piece in self._in_flight.items()})
                    for ref in ready:
                        progress.update(self._take(ref, on_piece))
                    for ref in late:
                        self._stalled(ref)
        finally:
            pool._open_call = None
            # The pool's size then counts only the workers it has (what a resize compares against).
            pool._drop_lost()

        answered = self._answered
        result = [rollout for index in range(len(prompts)) for rollout in answered.get(index, [])]
        # Each prompt's samples, once: a piece re-run after a worker's loss must neither drop nor repeat any.
        if any(len(answered.get(index, ())) != n for index in range(len(prompts))) or len(answered) != len(prompts):
            raise RuntimeError(
                f"rollout pool: expected {n} rollouts for each of {len(prompts)} prompts, "
                f"got {len(result)} for {len(answered)} prompts"
            )
        # From submission to collection: for a call collected after other work, a lower bound on the rate.
        elapsed = time.perf_counter() - self._started
        tokens = sum(len(r.response_token_ids) for r in result)
        self.stats = {
            "rollout/tokens_per_s": tokens / elapsed if elapsed > 0 else 0.0,
            "rollout/tokens": float(tokens),
            "rollout/samples": float(len(result)),
            "rollout/num_workers": float(self.num_workers),
            "rollout/worker_failures": float(self._failures),
            "rollout/workers_lost": float(self._lost),
        }
        pool._last_stats = self.stats
        return result

    def _take(self, ref: ray.ObjectRef, on_piece: Callable[[list[Rollout]], None] | None) -> int:
        """Collect one finished piece (or re-submit it after its worker's death); returns its rollouts' count."""
        worker, handle, indices, _ = self._in_flight.pop(ref)
        try:
            rollouts = ray.get(ref)
        except ray.exceptions.RayActorError as error:
            self._replace(
                worker,
                handle,
                indices,
                RuntimeError(
                    f"rollout pool: {self._failures + 1} worker failures in one generate call; the last: {error}"
                ),
            )
            return 0
        for rollout in rollouts:
            self._answered.setdefault(rollout.prompt_index, []).append(rollout)
        if on_piece is not None:
            on_piece(rollouts)
        return len(rollouts)

    def _stalled(self, ref: ray.ObjectRef) -> None:
        """A piece not back by its deadline: its worker is replaced like a dead one (its other pieces then fail
        and are re-run), unless the call has had all the failures it may."""
        worker, handle, indices, _ = self._in_flight.pop(ref)
        what = self.pool.describe(worker)
        log.warning(
            "%s: a generate piece of %d prompts was not back within its deadline (%s); replacing the "
            "worker and re-running its prompts",
            what,
            len(indices),
            GENERATE_KEY,
        )
        self._replace(
            worker,
            handle,
            indices,
            DeadlinePassed(
                f"{what} ({self._failures} workers already replaced in this call)",
                f"generating {len(indices)} prompts",
                self._piece_seconds(indices),
                GENERATE_KEY,
            ),
        )

    def _piece_seconds(self, indices: list[int]) -> float:
        return generate_deadline_s(len(indices) * self.n, self.pool.spec.max_new_tokens, self.pool.generate_timeout_s)

    def _replace(self, worker: int, handle: ray.actor.ActorHandle, indices: list[int], exhausted: Exception) -> None:
        """Restart `worker` (unless a failure of another of its pieces did already; then it counts once), or, if its
        node died, leave it lost; and split `indices` over the workers that are not restarting, or over the
        restarted ones when none is left. Raises `exhausted` when the call has replaced as many workers as it may,
        and WorkersLost when every worker is lost."""
        pool = self.pool
        if worker not in pool.lost and pool.group.actors[worker] == handle:
            if pool.node_died(worker):
                self._lost += 1
                pool.mark_lost(worker, f"re-running its {len(indices)} prompts")
            else:
                if self._failures >= pool.max_worker_failures:
                    raise exhausted
                self._failures += 1
                pool._restart(worker)
                self._restarted.add(worker)
                # Its next pieces wait for its engine to start and load the weights.
                self._due[worker] = time.monotonic() + pool.startup_deadline_s + pool.sync_deadline_s
        live = [w for w in range(pool.num_workers) if w not in pool.lost]
        survivors = [w for w in live if w not in self._restarted] or live
        if not survivors:
            raise pool.all_lost(f"{len(indices)} prompts of this call were not answered")
        for survivor, part in zip(survivors, assign_shards(len(indices), len(survivors))):
            self._submit(survivor, [indices[i] for i in part])


class RolloutPool:
    def __init__(
        self,
        spec: RolloutWorkerSpec,
        num_workers: int,
        *,
        num_cpus_per_worker: float = 1.0,
        num_gpus_per_worker: float = 0.0,
        resources_per_worker: dict[str, float] | None = None,
        weight_sync: SyncBackend | str = "object_store",
        name_prefix: str = "rollout",
        placement_strategy: str = "PACK",
        env: dict[str, str] | None = None,
        max_worker_failures: int = 3,
        verify_sync: bool = True,
        generate_timeout_s: float | None = None,
        sync_timeout_s: float | None = None,
        startup_timeout_s: float | None = None,
    ):
        self.weight_sync = make_backend(weight_sync) if isinstance(weight_sync, str) else weight_sync
        # The config's checks, for a pool built without one; then the cluster's, before any worker starts.
        refusal = config_refusal(self.weight_sync.name, rollout_backend=spec.backend)
        if refusal:
            raise ValueError(refusal)
        refusal = cluster_refusal(self.weight_sync.name, ray.cluster_resources().get("GPU", 0), "the Ray cluster")
        if refusal:
            raise RuntimeError(refusal)
        self.spec = dataclasses.replace(
            spec,
            engine_kwargs={**self.weight_sync.engine_kwargs(), **spec.engine_kwargs},
            **self.weight_sync.worker_kwargs(),
        )
        self.max_worker_failures = max_worker_failures
        self.group = ActorGroup(
            RolloutWorker,
            num_workers,
            name_prefix=name_prefix,
            make_kwargs=self.spec.worker_kwargs,
            num_cpus_per_actor=num_cpus_per_worker,
            num_gpus_per_actor=num_gpus_per_worker,
            resources_per_actor=resources_per_worker,
            placement_strategy=placement_strategy,
            env=env,
        )
        # A policy this machine cannot see gets the deadlines' floors.
        weight_bytes = checkpoint_bytes(spec.model_path)
        self.generate_timeout_s = generate_timeout_s
        self.sync_deadline_s = sync_deadline_s(weight_bytes, sync_timeout_s)
        self.startup_deadline_s = startup_deadline_s(weight_bytes, startup_timeout_s)
        # Waiting here surfaces a worker that cannot start (bad path, engine error) before the first round.
        try:
            wait_until_ready([self.group], self.startup_deadline_s)
        except BaseException:
            self.group.kill()  # a stuck worker would hold its resources after the start failed
            raise
        infos = self.group.call("ping")
        self.engine_start_seconds = [info["engine_start_seconds"] for info in infos]
        # The most threads a worker computes on (rollout.threads, else Ray's from its CPUs); a replacement starts
        # with the same environment.
        self.worker_threads = max(info["threads"] for info in infos)
        # A slot's bundle, hence its node (a Ray node id), stays when its worker is replaced, unless the node dies.
        self._nodes = [info["node"] for info in infos]
        # Slots whose worker was lost with its node; taken out of the pool at its next command.
        self.lost: set[int] = set()
        self.engine_dtype = infos[0]["dtype"]
        self.verify_sync = verify_sync and infos[0]["engine_ranks"] == 1
        if verify_sync and not self.verify_sync:
            log.warning(
                "rollout.verify_sync: an engine of %d ranks holds shards of each tensor; the weight "
                "fingerprint check after syncs is off",
                infos[0]["engine_ranks"],
            )
        self.version = 0
        # The last sync's strategy and payload: replayed to workers that join or restart.
        self._published: tuple[SyncBackend, Any] | None = None
        # The fingerprint of the last sync's weights (an adapter sync's: the learner's log-probs of the probe sample
        # with the adapter on and off), and the slots that loaded them since they were last checked.
        self._reference: Fingerprint | tuple[list[float], list[float]] | None = None
        self._probe: TokenSample | None = None
        self._unverified: set[int] = set()
        # Loads started on restarted workers, by the slot they load into.
        self._pending_loads: dict[ray.ObjectRef, int] = {}
        self._last_stats: dict[str, float] = {}
        self._open_call: GenerateCall | None = None

    @classmethod
    def from_config(
        cls, cfg: Config, policy_path: str, *, name_prefix: str = "rollout", env: dict[str, str] | None = None
    ) -> RolloutPool:
        rollout = cfg.rollout
        spec = RolloutWorkerSpec(
            model_path=policy_path,
            backend=rollout.backend,
            max_new_tokens=cfg.model.max_response_tokens,
            max_prompt_tokens=cfg.model.max_prompt_tokens,
            temperature=rollout.temperature,
            top_p=rollout.top_p,
            seed=cfg.seed,
            max_model_len=rollout.max_model_len,
            dtype=cfg.rollout_dtype,
            engine_kwargs=dict(rollout.engine_kwargs),
            chat_template=template_setting(cfg.data.chat_template),
        )
        return cls(
            spec,
            rollout.num_workers,
            num_cpus_per_worker=rollout.num_cpus_per_worker,
            num_gpus_per_worker=rollout.num_gpus_per_worker,
            resources_per_worker=rollout.resources,
            weight_sync=policy_backend(cfg).from_config(cfg),
            name_prefix=name_prefix,
            env=env,
            verify_sync=rollout.verify_sync,
            generate_timeout_s=rollout.generate_timeout_s,
            sync_timeout_s=rollout.sync_timeout_s,
            startup_timeout_s=rollout.startup_timeout_s,
        )

    # ------------------------------------------------------------------ workers

    @property
    def num_workers(self) -> int:
        return len(self.group)

    @property
    def workers(self) -> list[ray.actor.ActorHandle]:
        return self.group.actors

    @property
    def nodes(self) -> list[str]:
        """Each worker's Ray node id."""
        return list(self._nodes)

    def matmul_ceiling(self) -> float:
        """The workers' float32 matmul rates added up (FLOP/s), each measured with the others idle."""
        return sum(ray.get(worker.matmul_ceiling.remote()) for worker in self.workers)

    def _restart(self, index: int) -> ray.actor.ActorHandle:
        """A fresh worker in slot `index`; it loads the current weights before any later call reaches it."""
        handle = self.group.restart(index)
        if self._published is not None:
            strategy, payload = self._published
            [load] = strategy.apply([handle], payload, self.version)
            self._pending_loads[load] = index
            self._unverified.add(index)
        else:
            # Nothing to load, but the next call still waits for its engine to start: a piece queued behind a
            # start would otherwise spend its generate deadline on it.
            self._pending_loads[handle.__ray_ready__.remote()] = index
        return handle

    def _settle_pending_loads(self) -> None:
        """Wait for the restarted workers to start and load the current weights; one that does not in time stops
        the run (it was itself the replacement of a failed worker)."""
        self._drop_lost()
        pending, self._pending_loads = self._pending_loads, {}
        self._wait_workers(
            pending,
            self.startup_deadline_s + self.sync_deadline_s,
            f"starting and loading weights version {self.version}",
            replace=False,
        )
        self._verify()

    def _wait_loads(self, loads: dict[ray.ObjectRef, int], seconds: float, replace: bool) -> list[int]:
        """Wait at most `seconds` for each weight load (a ref per slot); returns the bytes each loaded. A worker
        that died or is still loading at the deadline is replaced (`replace`: it loads as it starts) or stops
        the pool with DeadlinePassed naming it."""
        return list(self._wait_workers(loads, seconds, f"loading weights version {self.version}", replace).values())

    def _wait_workers(
        self, calls: dict[ray.ObjectRef, int], seconds: float, phase: str, replace: bool
    ) -> dict[int, Any]:
        """Each call's result (a ref per slot), by slot, waiting at most `seconds`; a worker that died or is past
        the deadline is replaced (`replace`, for a load: the replacement loads as it starts) or raises, a stall
        as DeadlinePassed naming the worker and `phase`."""
        deadline = time.monotonic() + seconds
        pending, results = dict(calls), {}
        while pending:
            ready, late = wait_any(dict.fromkeys(pending, deadline))
            for ref in ready:
                slot = pending.pop(ref)
                try:
                    results[slot] = ray.get(ref)
                except ray.exceptions.RayActorError:
                    if self.node_died(slot):
                        self.mark_lost(slot, f"during {phase}")
                        if len(self.lost) == self.num_workers:
                            raise self.all_lost(f"during {phase}") from None
                        continue
                    if not replace:
                        raise
                    self._restart(slot)
            for ref in late:
                slot = pending.pop(ref)
                if not replace:
                    raise DeadlinePassed(self.describe(slot), phase, seconds, SYNC_KEY)
                log.warning(
                    "%s: did not finish %s within %g s (%s); replacing it",
                    self.describe(slot),
                    phase,
                    seconds,
                    SYNC_KEY,
                )
                self._restart(slot)
        return results

    def describe(self, index: int) -> str:
        """Worker `index` in words, for errors: its actor's name and its node."""
        return f"rollout worker {self.group.names[index]} on node {self._nodes[index]}"

    def node_died(self, index: int) -> bool:
        return self._nodes[index] in dead_nodes()

    def mark_lost(self, index: int, doing: str) -> None:
        self.lost.add(index)
        left = [self.describe(w) for w in range(self.num_workers) if w not in self.lost]
        then = f"{doing} on the {len(left)} workers left ({', '.join(left)})" if left else "no worker is left"
        log.warning("%s was lost with its node (the node died); %s", self.describe(index), then)

    def all_lost(self, what: str) -> WorkersLost:
        return WorkersLost(
            f"every rollout worker was lost with its node ({', '.join(self.describe(w) for w in sorted(self.lost))}): "
            f"{what}. Bring back nodes with the workers' resources (rollout.resources, rollout.num_cpus_per_worker) "
            "before resuming"
        )

    def _drop_lost(self) -> None:
        """Take lost workers out of the pool; the slots after each move down one."""
        if not self.lost:
            return
        keep = [slot for slot in range(self.num_workers) if slot not in self.lost]
        moved = {old: new for new, old in enumerate(keep)}
        for slot in sorted(self.lost, reverse=True):
            self.group.remove(slot)
            del self._nodes[slot]
        self._pending_loads = {ref: moved[slot] for ref, slot in self._pending_loads.items() if slot in moved}
        self._unverified = {moved[slot] for slot in self._unverified if slot in moved}
        self.lost = set()

    def _verify(self) -> None:
        """Check the fingerprint of every worker that loaded the current weights since the last check against
        the learner's."""
        slots, self._unverified = sorted(self._unverified), set()
        if self._reference is None or not slots:
            return
        if self._published[0].sends_adapter:
            self._verify_adapter(slots)
            return
        # Reading the weights back takes about as long as loading them.
        reported = self._wait_workers(
            {self.group.actors[slot].weights_fingerprint.remote(): slot for slot in slots},
            self.sync_deadline_s,
            "reporting its weight fingerprint",
            replace=False,
        )
        for slot, engine_fingerprint in sorted(reported.items()):
            difference = first_difference(self._reference, engine_fingerprint)
            if difference is not None:
                raise WeightsDiffer(
                    f"{self.describe(slot)} does not hold the policy it was sent (version {self.version}, "
                    f"{self._published[0].name} sync): {difference}. It would sample from other weights than the "
                    "learner trains; rollout.verify_sync=false turns this check off"
                )

    def _verify_adapter(self, slots: list[int]) -> None:
        """Each worker's log-probs of the probe sample against the learner's (apo_ray.lora.probe_mismatch)."""
        learner, base = self._reference
        reported = self._wait_workers(
            {self.group.actors[slot].response_logprobs.remote([self._probe]): slot for slot in slots},
            self.sync_deadline_s,
            "reading the probe sample",
            replace=False,
        )
        for slot, [logprobs] in sorted(reported.items()):
            mismatch = probe_mismatch(logprobs, learner, base, self.engine_dtype)
            if mismatch is not None:
                raise WeightsDiffer(
                    f"{self.describe(slot)} does not serve the LoRA adapter it was sent (adapter version "
                    f"{self.version}): {mismatch}. It would sample from other weights than the learner trains; "
                    "rollout.verify_sync=false turns this check off"
                )

    def probe_sample(self) -> TokenSample:
        """The adapter sync's probe sample, in the policy's tokens (asked of a worker once)."""
        if self._probe is None:
            self._probe = ray.get(self.workers[0].probe_sample.remote())
        return self._probe

    def versions(self) -> list[int]:
        self._refuse_while_open("versions")
        self._settle_pending_loads()
        return self.group.call("policy_version")

    def resize(self, num_workers: int) -> None:
        """Grow or shrink the pool between rounds; new workers get the current weights and version."""
        self._refuse_while_open("resize")
        self._settle_pending_loads()
        added = self.group.resize(num_workers)
        del self._nodes[num_workers:]
        wait_until_ready([self.group], self.startup_deadline_s)
        self._nodes += [info["node"] for info in ray.get([self.group.actors[i].ping.remote() for i in added])]
        if added:
            log.info("rollout pool: added %s", ", ".join(self.describe(i) for i in added))
        if added and self._published is not None:
            strategy, payload = self._published
            refs = strategy.apply([self.group.actors[i] for i in added], payload, self.version)
            self._wait_loads(dict(zip(refs, added)), self.sync_deadline_s, replace=False)
            self._unverified.update(added)
            self._verify()

    def shutdown(self) -> None:
        self.group.kill()
        if self._published is not None:
            strategy, payload = self._published
            strategy.release(payload)
            self._published = None

    # ------------------------------------------------------------------ generation

    def generate(self, prompts: Sequence[str], n: int, seed: int | None = None) -> list[Rollout]:
        """`n` rollouts per prompt, in prompt order (prompt_index = position in `prompts`)."""
        return self.submit(prompts, n, seed).result()

    def submit(
        self, prompts: Sequence[str], n: int, seed: int | None = None, pieces_per_worker: int = 1
    ) -> GenerateCall:
        """Start a `generate` call: the workers sample while the caller does other work (the asynchronous
        game trains meanwhile); `result()` collects it. One call is open at a time, and the pool takes no
        other command (sync, resize) until it is collected: its workers' weights and number stay as they were."""
        self._refuse_while_open("submit")
        self._settle_pending_loads()
        self._open_call = GenerateCall(self, prompts, n, seed, pieces_per_worker)
        return self._open_call

    def _refuse_while_open(self, command: str) -> None:
        if self._open_call is not None:
            raise RuntimeError(f"rollout pool: {command} while a generate call is open; collect its result() first")

    def last_stats(self) -> dict[str, float]:
        """Throughput of the last `generate` call (rollout/tokens_per_s, ...)."""
        return dict(self._last_stats)

    # ------------------------------------------------------------------ weights

    def sync(self, weights: Any, version: int, weight_sync: SyncBackend | None = None) -> dict[str, float]:
        """Load `weights` (named tensors, an object ref of them, or an HF dir for `disk`) as `version`,
        through `weight_sync` (default: the pool's strategy)."""
        strategy = weight_sync or self.weight_sync
        return self._sync(
            strategy, lambda: strategy.publish(weights, version), version, lambda: self._fingerprint_of(weights)
        )

    def sync_from(
        self, learner: ray.actor.ActorHandle, version: int, weight_sync: SyncBackend | None = None
    ) -> dict[str, float]:
        """Load the learner actor's current weights as `version`; nothing passes through the driver."""
        strategy = weight_sync or self.weight_sync
        # The learner computes its fingerprint, of the weights its send exported (or its log-probs of the probe),
        # while the workers load.
        reference = (
            (lambda: learner.probe_logprobs.remote(self.probe_sample()))
            if strategy.sends_adapter
            else (lambda: learner.weights_fingerprint.remote(self.engine_dtype))
        )
        stats = self._sync(
            strategy, lambda: strategy.publish_from(learner, version, verify=self.verify_sync), version, reference
        )
        if strategy.sends_adapter and self.verify_sync:
            effect = probe_effect(*self._reference, self.engine_dtype)
            stats.update({"sync/probe_s": stats.pop("timing/sync_fingerprint"), "sync/probe_effect": effect})
            log.info(
                "sync %d: every worker serves LoRA adapter version %d (probe check %.2f s; the adapter moves "
                "the probe's log-probs by %.1f tolerances)",
                version,
                version,
                stats["sync/probe_s"],
                effect,
            )
            if effect <= 2:
                log.warning(
                    "sync %d: the adapter moves the probe's log-probs by %.1f tolerances of %s, too "
                    "little for the probe to tell it from the base model",
                    version,
                    effect,
                    self.engine_dtype,
                )
        return stats

    def _fingerprint_of(self, weights: Any) -> Fingerprint:
        """The fingerprint of weights the driver was handed (named tensors, an object ref of them, an HF dir)."""
        if isinstance(weights, ray.ObjectRef):
            weights = ray.get(weights)
        pairs = read_checkpoint_dir(weights) if isinstance(weights, (str, Path)) else as_named_tensors(weights)
        return fingerprint(pairs, getattr(torch, self.engine_dtype))

    def _sync(
        self,
        strategy: SyncBackend,
        publish: Callable[[], Any],
        version: int,
        reference: Callable[[], Fingerprint | ray.ObjectRef],
    ) -> dict[str, float]:
        """`reference()`: the fingerprint of the weights `publish()` published, or a learner's ref to it."""
        self._refuse_while_open("sync")
        self._settle_pending_loads()
        started = time.perf_counter()
        payload = publish()
        expected = reference() if self.verify_sync else None
        previous, self._published, self.version = self._published, (strategy, payload), version
        refs = strategy.apply(self.group.actors, payload, version)
        # A worker that dies or stalls is replaced; the replacement loads `payload` as part of its start.
        loaded = self._wait_loads({ref: worker for worker, ref in enumerate(refs)}, self.sync_deadline_s, replace=True)
        seconds = time.perf_counter() - started
        # Workers restarted above load `payload` as they start; they are checked with the others.
        self._reference = gather(expected) if isinstance(expected, ray.ObjectRef) else expected
        self._unverified = set(range(self.num_workers))
        self._settle_pending_loads()
        check_seconds = time.perf_counter() - started - seconds
        if previous is not None and previous[1] != payload:
            previous[0].release(previous[1])
        stats = SyncStats(strategy.name, version, seconds, max(loaded, default=0), self.num_workers)
        return {**stats.metrics(), "timing/sync_fingerprint": check_seconds}
