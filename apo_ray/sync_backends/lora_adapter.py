"""`lora_adapter`: object_store's adapter-only form (learner.lora.sync 'adapter'). The policy learner sends its LoRA
adapter's tensors alone, in buckets of `rollout.sync_bucket_mb` through Ray's object store, after PEFT's adapter
config; each worker serves its unchanged base weights plus that adapter, tagged with the sync's version as its
adapter version (vLLM: a LoRARequest per version; HF generate: peft). The base weights never change, so the pool
proves a sync delivered by a probe sample's log-probs (apo_ray.lora.probe_mismatch) instead of the weight
fingerprint.

The payload is the object refs of the config and then of the buckets; the driver holds only the refs.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from apo_ray.fault_injection import corrupt_if_injected
from apo_ray.named_tensors import WeightBucket, pack_buckets, unpack_bucket
from apo_ray.sync_backends import DEFAULT_BUCKET_BYTES, register_backend
from apo_ray.sync_backends.object_store import ObjectStoreSync


@register_backend
class LoraAdapterSync(ObjectStoreSync):
    name = "lora_adapter"
    about = "the LoRA adapter alone, in object_store's buckets"
    adapter_form = None
    sends_adapter = True

    def __init__(self, bucket_bytes: int = DEFAULT_BUCKET_BYTES, rank: int = 16):
        super().__init__(bucket_bytes)
        self.rank = rank

    @classmethod
    def from_config(cls, cfg: Any) -> LoraAdapterSync:
        return cls(bucket_bytes=cfg.rollout.sync_bucket_mb * 2**20, rank=cfg.learner.lora.rank)

    def worker_kwargs(self) -> dict[str, Any]:
        return {"lora_rank": self.rank}

    def publish(self, weights: Any, version: int) -> list:
        raise TypeError("weight_sync 'lora_adapter': the adapter comes from the LoRA learner; call sync_from(learner)")

    def apply(self, workers, payload: list, version: int) -> list:
        return self.receive_on(workers, version, version, *payload)

    @staticmethod
    def send(learner: Any, bucket_bytes: int) -> Iterator[dict | WeightBucket]:
        """The adapter's PEFT config, then its tensors in buckets of at most `bucket_bytes`. Rank 0 alone yields
        them; under ZeRO-3 the other ranks join the gather and yield nothing."""
        adapter = learner.exported_adapter()
        if adapter is not None:
            config, state = adapter
            yield config
            yield from pack_buckets(state, bucket_bytes)

    @staticmethod
    def receive(worker: Any, version: int, config: dict, *buckets: WeightBucket) -> int:
        pairs = [pair for bucket in buckets for pair in unpack_bucket(bucket)]
        worker.engine.load_adapter(config, corrupt_if_injected("sync", worker.worker_index, pairs), version)
        return sum(bucket.nbytes for bucket in buckets)
