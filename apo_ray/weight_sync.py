"""Moving the policy learner's weights to the rollout workers: one interface, three strategies.

- ``object_store``: the learner groups its weights into buckets of ``rollout.sync_bucket_mb``
  (apo_ray/named_tensors.py) and each bucket goes into Ray's object store once; every worker reads those
  objects (no per-worker copy is sent; on the learner's node a worker reads shared memory) and reloads its
  engine in place from views of them. Works on any device.
- ``disk``: the learner saves an HF checkpoint directory; every worker reloads from it in place. The
  directory must be visible to all workers (one node, or a shared filesystem).
- ``nccl``: vLLM's weight-transfer API (``WeightTransferConfig(backend="nccl")``): the learner broadcasts
  its GPU tensors straight into the vLLM engines, packed into buffers of ``rollout.sync_bucket_mb`` (vLLM's
  packed broadcast). GPU only; selecting it on a CPU-only cluster fails at once, before any actor starts.

A strategy splits a sync in two so that the pool can replay it: ``publish`` (once per version, whatever
the number of workers) and ``apply`` (per worker; also used for workers that join or restart later).
The learner may be a multi-rank LearnerGroup (apo_ray/learner_group.py): its weights come from rank 0.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import ray
import torch

from apo_ray.learner_group import gather
from apo_ray.named_tensors import NamedTensors, as_named_tensors, checkpoint_files, pack_buckets, write_checkpoint_dir

# rollout.sync_bucket_mb's default: a 0.5B-parameter bf16 policy moves in 4 buckets; a bucket is the most
# that Ray serializes into the object store at once.
DEFAULT_BUCKET_BYTES = 256 * 2**20

@dataclass(frozen=True)
class SyncStats:
    strategy: str
    version: int
    seconds: float
    bytes: int  # size of the weights moved, counted once (not once per worker)
    workers: int

    def metrics(self) -> dict[str, float]:
        return {"timing/sync": self.seconds, "sync/bytes": float(self.bytes), "sync/workers": float(self.workers)}


class WeightSync(ABC):
    name: ClassVar[str]
    # The policy learner's method that `publish_from` / `apply` call (actors/policy.py PolicyLearner).
    learner_method: ClassVar[str]

    def engine_kwargs(self) -> dict[str, Any]:
        """Extra vLLM engine arguments the rollout workers need for this strategy."""
        return {}

    @abstractmethod
    def publish(self, weights: Any, version: int) -> Any:
        """Make `weights` available to workers; returns the payload `apply` hands to each worker."""

    @abstractmethod
    def publish_from(self, learner: ray.actor.ActorHandle, version: int) -> Any:
        """Like `publish`, with the learner actor producing the weights itself (nothing passes the driver)."""

    @abstractmethod
    def apply(self, workers: Sequence[ray.actor.ActorHandle], payload: Any, version: int) -> list[ray.ObjectRef]:
        """Start loading `payload` as `version` on each worker; each ref resolves to the bytes it loaded."""

    def release(self, payload: Any) -> None:
        """Free what `publish` made once no worker will need `payload` again."""

    def push(self, workers: Sequence[ray.actor.ActorHandle], weights: Any, version: int) -> SyncStats:
        """publish + apply on all workers, waiting for every worker."""
        started = time.perf_counter()
        loaded = ray.get(self.apply(workers, self.publish(weights, version), version))
        return SyncStats(self.name, version, time.perf_counter() - started, max(loaded, default=0), len(workers))


class ObjectStoreSync(WeightSync):
    """The payload is the list of the buckets' object refs; the driver holds only the refs."""

    name = "object_store"
    learner_method = "weight_buckets"

    def __init__(self, bucket_bytes: int = DEFAULT_BUCKET_BYTES):
        self.bucket_bytes = bucket_bytes

    def publish(self, weights: NamedTensors | ray.ObjectRef, version: int) -> list[ray.ObjectRef]:
        if isinstance(weights, ray.ObjectRef):
            weights = ray.get(weights)
        return [ray.put(bucket) for bucket in pack_buckets(weights, self.bucket_bytes)]

    def publish_from(self, learner: ray.actor.ActorHandle, version: int) -> list[ray.ObjectRef]:
        # A generator method: each bucket the learner yields is an object of its own, owned by this driver. A
        # group's buckets are rank 0's, gathered once every rank has left ZeRO-3's gather of the weights.
        return gather(getattr(learner, self.learner_method).remote(self.bucket_bytes))

    def apply(self, workers, payload: list[ray.ObjectRef], version: int) -> list[ray.ObjectRef]:
        # Top-level ref arguments are resolved by Ray on each worker: all of them read the same objects.
        return [worker.load_weight_buckets.remote(version, *payload) for worker in workers]


class DiskSync(WeightSync):
    name = "disk"
    learner_method = "save"

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="apo_ray_weights_"))
        # Only directories this strategy made are deleted on release; a path the caller gave stays theirs.
        self._written: set[str] = set()

    def _version_dir(self, version: int) -> Path:
        return self.root / f"policy_v{version}"

    def publish(self, weights: NamedTensors | str | Path, version: int) -> str:
        if isinstance(weights, (str, Path)):
            checkpoint_files(weights)
            return str(weights)
        path = str(write_checkpoint_dir(as_named_tensors(weights), self._version_dir(version)))
        self._written.add(path)
        return path

    def publish_from(self, learner: ray.actor.ActorHandle, version: int) -> str:
        path = str(self._version_dir(version))
        gather(getattr(learner, self.learner_method).remote(path))
        self._written.add(path)
        return path

    def apply(self, workers, payload: str, version: int) -> list[ray.ObjectRef]:
        return [worker.load_weights_from_dir.remote(payload, version) for worker in workers]

    def release(self, payload: str) -> None:
        if payload in self._written:
            self._written.discard(payload)
            shutil.rmtree(payload, ignore_errors=True)


def require_gpu_cluster(strategy: str) -> None:
    if ray.is_initialized():
        gpus = ray.cluster_resources().get("GPU", 0)
        where = "the Ray cluster"
    else:
        gpus = torch.cuda.device_count()
        where = "this machine"
    if not gpus:
        raise RuntimeError(
            f"rollout.weight_sync: {strategy!r} broadcasts GPU tensors over NCCL, but {where} has no GPU; "
            "use 'object_store' or 'disk' on a CPU-only cluster"
        )


class NcclSync(WeightSync):
    """vLLM's NCCL weight transfer: the learner (rank 0) broadcasts into every worker's engine.

    The learner actor offers ``send_weights_nccl(workers, bucket_bytes) -> bytes`` (PolicyLearner, through
    actors/nccl.py). Weights never pass through the driver, so there is nothing to publish: the payload
    is the learner.
    """

    name = "nccl"
    learner_method = "send_weights_nccl"

    def __init__(self, bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> None:
        require_gpu_cluster(self.name)
        self.bucket_bytes = bucket_bytes

    def engine_kwargs(self) -> dict[str, Any]:
        return {"weight_transfer_config": {"backend": "nccl"}}

    def publish(self, weights: Any, version: int) -> Any:
        raise TypeError("weight_sync 'nccl': weights stream from the learner's GPU; call sync_from(learner)")

    def publish_from(self, learner: ray.actor.ActorHandle, version: int) -> ray.actor.ActorHandle:
        return learner

    def apply(self, workers, payload: ray.actor.ActorHandle, version: int) -> list[ray.ObjectRef]:
        sent = getattr(payload, self.learner_method).remote(list(workers), self.bucket_bytes)
        # Passing `sent` as an argument makes each version bump wait until the broadcast has landed.
        return [worker.set_policy_version.remote(version, sent) for worker in workers]


WEIGHT_SYNCS: dict[str, type[WeightSync]] = {s.name: s for s in (ObjectStoreSync, DiskSync, NcclSync)}


def make_weight_sync(name: str, **options: Any) -> WeightSync:
    """The strategy called `name` (rollout.weight_sync). `nccl` raises here on a cluster without GPUs."""
    if name not in WEIGHT_SYNCS:
        raise ValueError(f"rollout.weight_sync: unknown strategy {name!r}; choose one of {', '.join(WEIGHT_SYNCS)}")
    return WEIGHT_SYNCS[name](**options)
