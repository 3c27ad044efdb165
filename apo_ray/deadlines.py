"""Deadlines for the driver's waits: what a wait may take, derived from the work it waits for, and the error that
names what was waited for when the deadline passed (the driver exits with code 6).

The defaults are deliberately generous (a floor plus a rate that a loaded CPU machine still beats by far): a
deadline exists to turn a hang into an error that names the actor, not to police speed. Each has a config key
that overrides it.
"""

from __future__ import annotations

import socket
from urllib.parse import urlsplit

# A worker stuck longer than this before its first token is not slow but stalled.
GENERATE_FLOOR_S = 120.0
# Seconds per token a piece may sample: 2 tokens/s, far below any engine's rate on one core.
GENERATE_S_PER_TOKEN = 0.5
SYNC_FLOOR_S = 120.0
# Bytes per second a worker must at least load weights at: 4 MB/s, below a disk's or the object store's rate.
SYNC_BYTES_PER_S = 4e6
STARTUP_FLOOR_S = 300.0
LEARNER_FLOOR_S = 900.0
# Seconds per sample per epoch a learner call may take: a forward and backward of a 135M-parameter model over
# 256 tokens is about 200 GFLOP (6 x parameters x tokens); 10 s allows well under 100 GFLOP/s and the policy
# step's extra passes (reference, critic) without letting a hang run for hours.
LEARNER_S_PER_SAMPLE = 10.0


class DeadlinePassed(TimeoutError):
    """A wait passed its deadline: the actor it waited for (and its node), in which phase, and the config key
    that sets the deadline. The driver adds the round and the checkpoint to resume from."""

    def __init__(self, what: str, phase: str, seconds: float, key: str):
        self.what, self.phase, self.seconds, self.key = what, phase, seconds, key
        super().__init__(f"{what} did not finish {phase} within {seconds:g} s (raise {key} if it needs longer)")


class ClusterUnreachable(DeadlinePassed):
    """Nothing accepted a connection at the Ray cluster's address within the deadline."""

    def __init__(self, address: str, reason: OSError, seconds: float, key: str):
        super().__init__(f"the Ray cluster at {address}", "joining the cluster", seconds, key)
        self.args = (
            f"cannot join the Ray cluster at {address}: nothing accepted a connection within {seconds:g} s "
            f"({reason}); check ray.address or RAY_ADDRESS, or raise {key}",
        )


def generate_deadline_s(samples: int, max_new_tokens: int, override: float | None) -> float:
    """What one piece of a generate call (`samples` samples of up to `max_new_tokens` tokens) may take."""
    return override if override is not None else GENERATE_FLOOR_S + GENERATE_S_PER_TOKEN * samples * max_new_tokens


def sync_deadline_s(nbytes: int, override: float | None) -> float:
    """What loading `nbytes` of weights into one worker may take."""
    return override if override is not None else SYNC_FLOOR_S + nbytes / SYNC_BYTES_PER_S


def startup_deadline_s(nbytes: int, override: float | None) -> float:
    """What starting a rollout worker, whose engine loads `nbytes` of weights, may take."""
    return override if override is not None else STARTUP_FLOOR_S + nbytes / SYNC_BYTES_PER_S


def learner_call_deadline_s(samples: int, epochs: int, override: float | None) -> float:
    """What one learner call over `samples` samples for `epochs` epochs may take (a call without samples: a
    checkpoint, a weight gather, gets the floor)."""
    return override if override is not None else LEARNER_FLOOR_S + LEARNER_S_PER_SAMPLE * samples * epochs


def gcs_endpoint(address: str) -> tuple[str, int] | None:
    """The host and port that joining the cluster at `address` connects to first, or None where Ray finds it
    itself ('auto', 'local': a file on this machine names it)."""
    if address in ("auto", "local"):
        return None
    parts = urlsplit(address if "://" in address else f"ray://{address}")
    if parts.hostname is None or parts.port is None:
        return None
    return parts.hostname, parts.port


def probe_cluster(address: str, timeout_s: float, key: str) -> None:
    """Raise ClusterUnreachable unless something accepts a connection at `address` within `timeout_s`: ray.init
    against an address nobody answers at retries inside Ray for minutes."""
    endpoint = gcs_endpoint(address)
    if endpoint is None:
        return
    try:
        socket.create_connection(endpoint, timeout=timeout_s).close()
    except OSError as error:
        raise ClusterUnreachable(address, error, timeout_s, key) from error
