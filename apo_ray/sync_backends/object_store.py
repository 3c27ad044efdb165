"""`object_store` (the default): the learner groups its weights into buckets of `rollout.sync_bucket_mb`
(apo_ray/named_tensors.py) and each bucket goes into Ray's object store once; every worker reads those objects (no
per-worker copy is sent; on the learner's node a worker reads shared memory) and reloads its engine in place from
views of them. Works on any device.

The payload is the list of the buckets' object refs; the driver holds only the refs.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from apo_ray.fault_injection import corrupt_if_injected
from apo_ray.named_tensors import NamedTensors, WeightBucket, pack_buckets, unpack_bucket
from apo_ray.sync_backends import DEFAULT_BUCKET_BYTES, SyncBackend, register_backend


@register_backend
class ObjectStoreSync(SyncBackend):
    name = "object_store"
    about = "Ray's object store, any device"
    streams = True
    uses_buckets = True
    adapter_form = "lora_adapter"

    def __init__(self, bucket_bytes: int = DEFAULT_BUCKET_BYTES):
        self.bucket_bytes = bucket_bytes

    def publish(self, weights: NamedTensors | Any, version: int) -> list:
        import ray

        if isinstance(weights, ray.ObjectRef):
            weights = ray.get(weights)
        return [ray.put(bucket) for bucket in pack_buckets(weights, self.bucket_bytes)]

    def publish_from(self, learner: Any, version: int, verify: bool = False) -> list:
        from apo_ray.learner_group import gather

        # A generator method: each bucket the learner yields is an object of its own, owned by this driver. A
        # group's buckets are rank 0's, gathered once every rank has left ZeRO-3's gather of the weights.
        return gather(self.send_from(learner, verify, self.bucket_bytes))

    def apply(self, workers, payload: list, version: int) -> list:
        # Top-level ref arguments are resolved by Ray on each worker: all of them read the same objects.
        return self.receive_on(workers, version, *payload)

    @staticmethod
    def send(learner: Any, bucket_bytes: int) -> Iterator[WeightBucket]:
        """The weights in buckets of at most `bucket_bytes`. Rank 0 alone yields them; under ZeRO-3 the other
        ranks join the gather and yield nothing."""
        state = learner.exported_weights()
        if state is not None:
            yield from pack_buckets(state, bucket_bytes)

    @staticmethod
    def receive(worker: Any, *buckets: WeightBucket) -> int:
        """Ray resolves each bucket's object ref to a read-only view of the object store's shared memory: the engine
        copies the tensors straight out of it."""
        pairs = [pair for bucket in buckets for pair in unpack_bucket(bucket)]
        worker.engine.load(corrupt_if_injected("sync", worker.worker_index, pairs))
        return sum(bucket.nbytes for bucket in buckets)
