"""Faults that tests inject into a real actor's real call, so that what catches them in a run (a deadline, the
weight fingerprint) is tested as it runs. A run never sets them: the actor reads `APO_RAY_INJECT_FAULTS`, a JSON
list of faults, from its environment (the pool's `env` passes it to its workers).

A fault: {"kind": "stall" | "corrupt" | "drop" (a sync's load skipped while the worker reports it done), "phase": a
call's name ("start", "generate", "sync" of a rollout worker, "step" of a learner), "worker": a rollout worker's
index or a learner's rank (absent: every one), "seconds": how long a stall sleeps, "tensor": the checkpoint tensor a
corruption adds 1 to, "once": a file that the fault creates when it fires and that stops it firing again (a
replacement worker then runs clean)}.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

ENV = "APO_RAY_INJECT_FAULTS"
KINDS = ("stall", "corrupt", "drop")


def passed_on() -> dict[str, str]:
    """The faults a test injected into this process's environment, as env vars for the actors it starts (on
    any node, whose processes do not inherit the driver's environment); empty in a run."""
    return {ENV: os.environ[ENV]} if ENV in os.environ else {}


def _firing(kind: str, phase: str, worker: int) -> list[dict]:
    faults = json.loads(os.environ.get(ENV) or "[]")
    for fault in faults:
        if fault.get("kind") not in KINDS:
            raise ValueError(f"{ENV}: unknown fault kind {fault.get('kind')!r}; choose one of {', '.join(KINDS)}")
    firing = []
    for fault in faults:
        if fault["kind"] != kind or fault.get("phase") != phase or fault.get("worker", worker) != worker:
            continue
        once = fault.get("once")
        if once:
            try:
                Path(once).touch(exist_ok=False)
            except FileExistsError:
                continue
        firing.append(fault)
    return firing


def stall_if_injected(phase: str, worker: int) -> None:
    for fault in _firing("stall", phase, worker):
        time.sleep(float(fault["seconds"]))


def corrupt_if_injected(
    phase: str, worker: int, named_tensors: list[tuple[str, torch.Tensor]]
) -> list[tuple[str, torch.Tensor]]:
    """`named_tensors` with 1 added to each injected tensor (a copy: the originals may be read-only views)."""
    names = {fault["tensor"] for fault in _firing("corrupt", phase, worker)}
    return [(name, tensor + 1 if name in names else tensor) for name, tensor in named_tensors]


def dropped_if_injected(phase: str, worker: int) -> bool:
    return bool(_firing("drop", phase, worker))
