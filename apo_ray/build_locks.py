"""Lock files of torch C++ extension builds, where DeepSpeed JIT-builds its ops.

`torch.utils.cpp_extension` builds an op under `<build dir>/lock`, created by torch's FileBaton, which keeps
the file's descriptor open until the build ends and then deletes it. A process killed mid-build leaves the
file behind, and every later build of that op waits for it to disappear: forever, idle, with no message.
A lock that no process has open is such a leftover; one that a process has open is a build in progress.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


def build_locks() -> list[Path]:
    """The build locks of this machine's torch extensions cache (TORCH_EXTENSIONS_DIR or torch's default)."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return sorted(Path(root).glob("*/lock"))
    from torch.utils.cpp_extension import get_default_build_root

    # Without TORCH_EXTENSIONS_DIR, torch adds a folder per Python and accelerator: py311_cpu/<op>/lock.
    return sorted(Path(get_default_build_root()).glob("*/*/lock"))


def lock_holders(lock: Path) -> list[int] | None:
    """PIDs of the processes of this machine that have `lock` open; None when that cannot be known.

    Only a process running as the lock's owner can have created it, so the answer is unknown only when one
    of those cannot be inspected.
    """
    target = os.path.realpath(lock)
    try:
        owner = lock.stat().st_uid
    except FileNotFoundError:
        return []
    if not Path("/proc/self/fd").is_dir():  # no procfs (macOS): nothing to look at
        return None
    holders, blind = [], False
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fds = list((proc / "fd").iterdir())
        except PermissionError:
            try:
                blind = blind or proc.stat().st_uid == owner
            except FileNotFoundError:
                pass
            continue
        except FileNotFoundError:  # the process exited while we looked
            continue
        for fd in fds:
            try:
                if os.readlink(fd) == target:
                    holders.append(int(proc.name))
                    break
            except OSError:
                continue
    return None if blind and not holders else holders


def describe(lock: Path, holders: list[int] | None) -> str:
    if holders:
        return f"{lock} (a build in progress: held by pid {', '.join(map(str, holders))})"
    if holders is None:
        return (
            f"{lock} (perhaps left by a build that was killed: not every process that could hold it can be "
            "inspected; delete it if no build is running)"
        )
    return f"{lock} (stale: no process holds it, a build was killed mid-way; delete it)"


def report() -> str:
    """One line naming every build lock of this machine and who holds it; '' when there is none."""
    locks = [describe(lock, lock_holders(lock)) for lock in build_locks()]
    return f"torch extension build locks: {'; '.join(locks)}" if locks else ""


def clear_stale() -> list[Path]:
    """Delete the build locks that no process holds and name the others (warnings); returns those deleted."""
    removed = []
    for lock in build_locks():
        holders = lock_holders(lock)
        if holders == []:
            lock.unlink(missing_ok=True)
            removed.append(lock)
            log.warning(
                "removed the stale torch extension build lock %s: no process holds it (a build was killed mid-way)",
                lock,
            )
        else:
            log.warning(
                "torch extension build lock %s: a build of that op waits until it is gone", describe(lock, holders)
            )
    return removed
