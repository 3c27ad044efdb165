"""What the workers of a Ray cluster that apo-ray starts itself must share with the driver: its code."""

from __future__ import annotations

import os
from pathlib import Path

import apo_ray


def driver_source_env() -> dict[str, str]:
    """PYTHONPATH with the directory this driver's apo_ray was imported from in front. Local workers would
    otherwise import whichever apo_ray their interpreter finds first (another checkout's editable install, an
    installed wheel) and run other code than the driver, or miss apo_ray.actors. A joined cluster gets the
    code through the job's working_dir instead."""
    root = str(Path(apo_ray.__file__).resolve().parent.parent)
    rest = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != root]
    return {"PYTHONPATH": os.pathsep.join([root, *rest])}
