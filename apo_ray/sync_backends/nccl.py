"""`nccl`: vLLM's weight-transfer API (``WeightTransferConfig(backend="nccl")``): the policy learner (rank 0 of its
group) broadcasts its GPU tensors straight into every rollout worker's vLLM engine, packed into buffers of
`rollout.sync_bucket_mb` (vLLM's packed broadcast). GPU only; refused on a CPU-only cluster before any actor starts.

Weights never pass through the driver, so there is nothing to publish: the payload is the learner.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from apo_ray.sync_backends import DEFAULT_BUCKET_BYTES, SyncBackend, register_backend


class RolloutEnginesClient:
    """vLLM's VLLMWeightSyncClient protocol over several independent rollout engines.

    vLLM's own Ray client gives every engine the same rank offset; here engine i joins the NCCL group
    at ranks after engine i-1's, so N single-engine actors share one group with the learner.
    """

    def __init__(self, workers: Sequence[Any], ranks_per_worker: Sequence[int]):
        self.workers = list(workers)
        self.rank_offsets = [1 + sum(ranks_per_worker[:i]) for i in range(len(self.workers))]

    def _all(self, method: str, kwargs_per_worker: Sequence[dict] | None = None) -> None:
        import ray

        kwargs_per_worker = kwargs_per_worker or [{}] * len(self.workers)
        ray.get([w.weight_transfer_rpc.remote(method, kw) for w, kw in zip(self.workers, kwargs_per_worker)])

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        self._all(
            "init_weight_transfer_engine",
            [{"init_info": {**init_info, "rank_offset": offset}} for offset in self.rank_offsets],
        )

    def shutdown_weight_transfer_engine(self) -> None:
        self._all("shutdown_weight_transfer_engine")

    def start_weight_update(self) -> None:
        self._all("start_weight_update")

    def update_weights(self, update_info: dict[str, Any]) -> None:
        self._all("update_weights", [{"update_info": update_info}] * len(self.workers))

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self._all("finish_weight_update")


class NcclWeightSender:
    """The learner's side: broadcasts `module`'s parameters to the given rollout workers.

    The NCCL group is built on the first send and rebuilt when the set of workers changes (a resize or a
    restart), since an NCCL group's size is fixed. Tensors go through vLLM's packed broadcast: flat buffers of
    `bucket_bytes` (two in flight), one broadcast per buffer rather than one per tensor.
    """

    def __init__(self, module: torch.nn.Module, bucket_bytes: int):
        self.module = module
        self.bucket_bytes = bucket_bytes
        self._engine = None
        self._workers: list = []

    def send(self, workers: Sequence[Any]) -> int:
        import ray
        from vllm.distributed.weight_transfer.base import ModuleSource
        from vllm.distributed.weight_transfer.nccl_engine import (
            NCCLTrainerInitInfo,
            NCCLTrainerWeightTransferEngine,
        )

        from apo_ray.actors.engine import free_port

        if list(workers) != self._workers:
            self.close()
            ranks = [info["engine_ranks"] for info in ray.get([w.ping.remote() for w in workers])]
            init_info = NCCLTrainerInitInfo(
                master_address=ray.util.get_node_ip_address(),
                master_port=free_port(),
                world_size=1 + sum(ranks),
                rank=0,
                packed=True,
                packed_buffer_size_bytes=self.bucket_bytes,
            )
            self._engine = NCCLTrainerWeightTransferEngine.trainer_init(
                init_info, client=RolloutEnginesClient(workers, ranks), source=ModuleSource(self.module)
            )
            self._workers = list(workers)
        self._engine.send_weights()
        return sum(p.numel() * p.element_size() for p in self.module.parameters())

    def close(self) -> None:
        import ray

        if self._engine is None:
            return
        for worker in self._workers:
            try:
                ray.get(worker.weight_transfer_rpc.remote("shutdown_weight_transfer_engine", {}))
            except ray.exceptions.RayActorError:
                pass  # a dead worker has no group to leave
        self._engine.shutdown()
        self._engine, self._workers = None, []


@register_backend
class NcclSync(SyncBackend):
    name = "nccl"
    about = "vLLM's weight transfer on GPU"
    needs_gpu = "broadcasts GPU tensors"
    needs_vllm = True
    # The broadcast reads the learner's parameters as they are, and ZeRO-3 holds only a shard of each.
    gathers_zero3 = False
    exports_weights = False
    rank0_only = True
    uses_buckets = True

    def __init__(self, bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> None:
        self.bucket_bytes = bucket_bytes

    def engine_kwargs(self) -> dict[str, Any]:
        return {"weight_transfer_config": {"backend": "nccl"}}

    def publish(self, weights: Any, version: int) -> Any:
        raise TypeError("weight_sync 'nccl': weights stream from the learner's GPU; call sync_from(learner)")

    def publish_from(self, learner: Any, version: int, verify: bool = False) -> Any:
        return learner

    def apply(self, workers, payload: Any, version: int) -> list:
        # verify False: the broadcast exports no copy; the learner's weights_fingerprint reads the weights as they are.
        sent = self.send_from(payload, False, list(workers), self.bucket_bytes)
        # Passing `sent` as an argument makes each version bump wait until the broadcast has landed.
        return self.receive_on(workers, version, sent)

    @staticmethod
    def send(learner: Any, workers: list, bucket_bytes: int) -> int:
        """Broadcast the weights into the workers' vLLM engines; the sender (and its NCCL group) stays with the
        learner between syncs."""
        sender = learner.sync_state.get("nccl")
        if sender is None:
            sender = learner.sync_state["nccl"] = NcclWeightSender(learner.model, bucket_bytes)
        return sender.send(workers)

    @staticmethod
    def receive(worker: Any, loaded_bytes: int) -> int:
        # The broadcast went into the engine through weight_transfer_rpc; `loaded_bytes` is what the learner sent.
        return loaded_bytes
