"""`disk`: the weights are written as a safetensors checkpoint directory under the run's run_dir (by the learner's
rank 0, or by the driver for weights it was handed) and every worker reloads its engine in place from it. The
directory must be visible to all workers: one node, or a shared filesystem.

The payload is the directory's path.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from apo_ray.named_tensors import NamedTensors, as_named_tensors, checkpoint_files, write_checkpoint_dir
from apo_ray.sync_backends import SyncBackend, register_backend


@register_backend
class DiskSync(SyncBackend):
    name = "disk"
    about = "a checkpoint the engines reload in place"
    shared_filesystem = True

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="apo_ray_weights_"))
        # Only directories this backend made are deleted on release; a path the caller gave stays theirs.
        self._written: set[str] = set()

    @classmethod
    def from_config(cls, cfg: Any) -> DiskSync:
        return cls(root=Path(cfg.run_dir).resolve() / "rollout_weights")

    def _version_dir(self, version: int) -> Path:
        return self.root / f"policy_v{version}"

    def publish(self, weights: NamedTensors | str | Path, version: int) -> str:
        if isinstance(weights, (str, Path)):
            checkpoint_files(weights)
            return str(weights)
        path = str(write_checkpoint_dir(as_named_tensors(weights), self._version_dir(version)))
        self._written.add(path)
        return path

    def publish_from(self, learner: Any, version: int, verify: bool = False) -> str:
        from apo_ray.learner_group import gather

        path = str(self._version_dir(version))
        gather(self.send_from(learner, verify, path))
        self._written.add(path)
        return path

    def apply(self, workers, payload: str, version: int) -> list:
        return self.receive_on(workers, version, payload)

    def release(self, payload: str) -> None:
        if payload in self._written:
            self._written.discard(payload)
            shutil.rmtree(payload, ignore_errors=True)

    @staticmethod
    def send(learner: Any, directory: str) -> None:
        """Rank 0 writes the weights to `directory`; under ZeRO-3 the other ranks join the gather."""
        state = learner.exported_weights()
        if state is not None:
            write_checkpoint_dir(list(state.items()), directory)

    @staticmethod
    def receive(worker: Any, path: str) -> int:
        files = checkpoint_files(path)
        worker.engine.load_dir(str(path))
        return sum(f.stat().st_size for f in files)
