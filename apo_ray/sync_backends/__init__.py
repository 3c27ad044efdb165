"""The weight-sync backends (`rollout.weight_sync`): how the policy learner's new weights reach the rollout workers
after each step. One module per backend in this package, each defining a `SyncBackend` subclass and registering it
with `register_backend`; importing the package imports every module in it, so a new backend is one new file
(docs/extending.md, "Adding a weight-sync backend").

A backend holds every side of a sync:
- the driver's (apo_ray/rollout_pool.py): `publish` or `publish_from` once per version, whatever the number of
  workers; `apply` per worker (also for workers that join or restart later); `release` once a newer version
  replaced it;
- the policy learner's: `send(learner, *args)`, run by the learner's shell method `learner_method()`
  (actors/policy.py);
- each rollout worker's: `receive(worker, *args)`, run by RolloutWorker.receive_weights (actors/rollout.py).

It declares what it needs, and these read the declarations rather than naming backends:
- apo_ray.config: `rollout.weight_sync`'s choices and description, which backends read `rollout.sync_bucket_mb`, and
  the cross-checks (`needs_vllm`, `gathers_zero3`, `exports_weights`, `adapter_form`), through `config_refusal`;
- the rollout pool (apo_ray/rollout_pool.py): `sends_adapter`, checked by a probe sample instead of the fingerprint;
- the dry run (apo_ray.train) and the pool's start-up: `needs_gpu`, through `cluster_refusal`; the dry run's note on
  a cluster of several nodes: `shared_filesystem`;
- the learners' start-up (apo_ray.cluster): the methods a learner group runs on rank 0 alone (`rank0_only`).

Layer: read by the driver, the actors and the config alike, so at import time a backend imports only the pure core
(the config and the learners read the declarations without Ray, tests/test_layers.py); the Ray, vLLM and driver or
learner helpers a side needs are imported inside the functions of that side.
"""

from __future__ import annotations

import importlib
import pkgutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

# rollout.sync_bucket_mb's default: a 0.5B-parameter bf16 policy moves in 4 buckets; a bucket is the most that Ray
# serializes into the object store at once.
DEFAULT_BUCKET_BYTES = 256 * 2**20

# The policy learner's shell methods a backend's `send` runs in (actors/policy.py PolicyLearner): on every rank of a
# group (ZeRO-3's gather needs them all), as a generator on every rank (each item an object of its own), or on rank 0
# alone (below ZeRO-3 it holds every weight).
SEND, STREAM, SEND_RANK0 = "send_weights", "stream_weights", "send_weights_rank0"


@dataclass(frozen=True)
class SyncStats:
    strategy: str
    version: int
    seconds: float
    bytes: int  # size of the weights moved, counted once (not once per worker)
    workers: int

    def metrics(self) -> dict[str, float]:
        return {"timing/sync": self.seconds, "sync/bytes": float(self.bytes), "sync/workers": float(self.workers)}


class SyncBackend:
    """One backend: its declarations (class attributes) and its three sides."""

    name: ClassVar[str]
    about: ClassVar[str]  # a few words for rollout.weight_sync's description
    # Why it needs a GPU in the cluster ("" when it does not): refused on a cluster without one.
    needs_gpu: ClassVar[str] = ""
    # Needs rollout.backend 'vllm' (the engine's weight-transfer API).
    needs_vllm: ClassVar[bool] = False
    # Sends a ZeRO-3 learner's weights gathered from its shards; False: refused with learner.zero_stage 3.
    gathers_zero3: ClassVar[bool] = True
    # Sends the learner's exported weights (LoRA's merged into the base); False: its parameters as they are, which
    # under peft are base and adapter apart, so refused with learner.lora on the policy.
    exports_weights: ClassVar[bool] = True
    # The learner's send runs on rank 0 of a group alone (it needs every weight on one rank, hence not ZeRO-3).
    rank0_only: ClassVar[bool] = False
    # The learner's send yields the pieces it sends, each an object of its own in Ray's object store.
    streams: ClassVar[bool] = False
    # Every worker reads files the learner or the driver writes under run_dir: one node or a shared filesystem.
    shared_filesystem: ClassVar[bool] = False
    # Reads rollout.sync_bucket_mb (constructed with bucket_bytes).
    uses_buckets: ClassVar[bool] = False
    # The backend that sends the policy's LoRA adapter alone through this one's transport (learner.lora.sync
    # 'adapter'); None: this backend sends whole weights only.
    adapter_form: ClassVar[str | None] = None
    # Sends a LoRA adapter alone, which the engines serve beside their base weights: the adapter form of another
    # backend, not a rollout.weight_sync choice of its own. The base weights never change, so a probe sample's
    # log-probs, not the weight fingerprint, prove it delivered.
    sends_adapter: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.rank0_only and (cls.streams or cls.gathers_zero3):
            raise ValueError(
                f"weight sync {cls.name}: a rank-0 send neither streams nor gathers ZeRO-3 shards "
                "(the other ranks would not join the gather)"
            )

    @classmethod
    def from_config(cls, cfg: Any) -> SyncBackend:
        """The backend as the run's config (apo_ray.config.Config) sets it up."""
        return cls(bucket_bytes=cfg.rollout.sync_bucket_mb * 2**20) if cls.uses_buckets else cls()

    @classmethod
    def learner_method(cls) -> str:
        return SEND_RANK0 if cls.rank0_only else STREAM if cls.streams else SEND

    def engine_kwargs(self) -> dict[str, Any]:
        """Extra vLLM engine arguments the rollout workers need for this backend."""
        return {}

    def worker_kwargs(self) -> dict[str, Any]:
        """Extra RolloutWorker arguments (on any engine) the rollout workers need for this backend."""
        return {}

    # ------------------------------------------------------------------ the driver's side

    def publish(self, weights: Any, version: int) -> Any:
        """Make `weights` available to workers; returns the payload `apply` hands to each worker."""
        raise NotImplementedError

    def publish_from(self, learner: Any, version: int, verify: bool = False) -> Any:
        """Like `publish`, with the learner actor (or group) sending its weights itself: nothing passes the driver.
        `verify`: the learner's `weights_fingerprint` is asked for next (it reads the weights its send exported)."""
        raise NotImplementedError

    def send_from(self, learner: Any, verify: bool, *args: Any) -> Any:
        """Start the learner's side: its shell method runs this backend's `send(learner, *args)`."""
        return getattr(learner, self.learner_method()).remote(self.name, verify, *args)

    def apply(self, workers: Sequence[Any], payload: Any, version: int) -> list:
        """Start loading `payload` as `version` on each worker; each ref resolves to the bytes it loaded."""
        raise NotImplementedError

    def receive_on(self, workers: Sequence[Any], version: int, *args: Any) -> list:
        """Each worker's side: RolloutWorker.receive_weights runs this backend's `receive(worker, *args)`."""
        return [worker.receive_weights.remote(self.name, version, *args) for worker in workers]

    def release(self, payload: Any) -> None:
        """Free what `publish` made once no worker will need `payload` again."""

    def push(self, workers: Sequence[Any], weights: Any, version: int) -> SyncStats:
        """publish + apply on all workers, waiting for every worker."""
        import ray

        started = time.perf_counter()
        loaded = ray.get(self.apply(workers, self.publish(weights, version), version))
        return SyncStats(self.name, version, time.perf_counter() - started, max(loaded, default=0), len(workers))

    # ------------------------------------------------------------------ the learner's and the worker's sides

    @staticmethod
    def send(learner: Any, *args: Any) -> Any:
        """On the policy learner (each rank its shell method runs on): send its weights; what it returns (or
        yields, for a backend that `streams`) goes back to the driver."""
        raise NotImplementedError

    @staticmethod
    def receive(worker: Any, *args: Any) -> int:
        """On a rollout worker: load what `apply` handed it into its engine; returns the bytes it loaded."""
        raise NotImplementedError


_REGISTRY: dict[str, type[SyncBackend]] = {}


def register_backend(backend: type[SyncBackend]) -> type[SyncBackend]:
    """Add a backend to the registry (a class decorator); a name may be registered once."""
    if backend.name in _REGISTRY:
        raise ValueError(f"weight sync {backend.name}: registered twice")
    _REGISTRY[backend.name] = backend
    return backend


def backends() -> list[type[SyncBackend]]:
    """rollout.weight_sync's backends (the adapter forms are reached through learner.lora.sync); the default,
    object_store, first and the others by name (the docs' order)."""
    return sorted(
        (b for b in _REGISTRY.values() if not b.sends_adapter), key=lambda b: (b.name != "object_store", b.name)
    )


def backend_names() -> tuple[str, ...]:
    return tuple(b.name for b in backends())


def get_backend(name: str) -> type[SyncBackend]:
    if name not in _REGISTRY:
        raise ValueError(f"rollout.weight_sync: unknown strategy {name!r}; choose one of {', '.join(backend_names())}")
    return _REGISTRY[name]


def make_backend(name: str, **options: Any) -> SyncBackend:
    """The backend called `name` (rollout.weight_sync), built with `options` (bucket_bytes, root, ...)."""
    return get_backend(name)(**options)


def policy_backend(cfg: Any) -> type[SyncBackend]:
    """The backend a run's policy sync uses: rollout.weight_sync's, or its adapter form when the policy trains a
    LoRA adapter with learner.lora.sync 'adapter' (the config refused a backend without one)."""
    backend = get_backend(cfg.rollout.weight_sync)
    lora = cfg.learner.lora
    if lora.applies_to("policy") and lora.sync == "adapter":
        return get_backend(backend.adapter_form)
    return backend


def rank_zero_learner_methods() -> tuple[str, ...]:
    """The policy learner's methods a learner group calls on rank 0 alone (apo_ray.cluster)."""
    return tuple(sorted({b.learner_method() for b in backends() if b.rank0_only}))


def _named(names: Sequence[str]) -> str:
    quoted = [repr(name) for name in names]
    return " or ".join(quoted) if len(quoted) < 3 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"


def config_refusal(
    name: str, *, rollout_backend: str, zero_stage_3: bool = False, lora: bool = False, adapter: bool = False
) -> str | None:
    """Why the config cannot use backend `name` with this rollout engine and learner (None: it can); the message
    names the key. Read by apo_ray.config's cross-checks and by a rollout pool built without a config."""
    backend = get_backend(name)
    if backend.needs_vllm and rollout_backend != "vllm":
        return f"rollout.weight_sync: {name!r} needs rollout.backend 'vllm'"
    if zero_stage_3 and not backend.gathers_zero3:
        others = [b.name for b in backends() if b.gathers_zero3]
        return (
            f"rollout.weight_sync: {name!r} does not gather ZeRO-3 shards yet; use learner.zero_stage 0-2 with "
            f"{name!r}, or rollout.weight_sync {_named(others)} at stage 3"
        )
    if lora and not backend.exports_weights:
        others = [b.name for b in backends() if b.exports_weights]
        return (
            f"rollout.weight_sync: {name!r} sends the policy's parameters as they are, not LoRA's merged "
            f"weights; use {_named(others)} with learner.lora.enabled"
        )
    if lora and adapter and backend.adapter_form is None:
        others = [b.name for b in backends() if b.adapter_form]
        return (
            f"learner.lora.sync: 'adapter' sends the adapter through rollout.weight_sync {_named(others)}, not "
            f"{name!r}; use learner.lora.sync 'merged' with {name!r}"
        )
    return None


def cluster_refusal(name: str, gpus: float, where: str = "the cluster") -> str | None:
    """Why backend `name` cannot run on `where`, which has `gpus` GPUs (None: it can); read by the dry run and the
    rollout pool's start-up."""
    backend = get_backend(name)
    if backend.needs_gpu and not gpus:
        others = [b.name for b in backends() if not b.needs_gpu]
        return (
            f"rollout.weight_sync: {name!r} {backend.needs_gpu} and {where} has no GPU; use {_named(others)} "
            "on a CPU-only cluster"
        )
    return None


def _import_every_backend() -> None:
    for module in sorted(info.name for info in pkgutil.iter_modules(__path__)):
        importlib.import_module(f"{__name__}.{module}")


_import_every_backend()
