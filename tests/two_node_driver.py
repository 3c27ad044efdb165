"""A training run on a Ray cluster of three nodes on this machine, and the node faults tests/test_two_nodes.py checks.

Run as a script (the test suite's own Ray cluster lives in the pytest process): it starts a head node that holds
the learners (custom resource `learner_node`) and two nodes of one rollout worker each (`rollout_node`), and runs
`apo-ray train` in this process against that cluster. The faults are played as an operator and a failing machine
would, timed by the game: at the start of a round's sampling call (a wrapper around RoundSampler._submit, which
then runs as it is) and, while the call runs, from a thread:

1. round 1: worker 1 stalls in its generate call (an injected fault, armed as the call starts) and its node is
   removed while it does;
2. round 2, before its call: a fresh node with the same resources joins, and `apo-ray resize RUN_DIR 2` asks for
   two workers again;
3. round 3: worker 0 stalls likewise, and both rollout nodes are removed: no worker is left.

It prints one JSON line, `OBSERVED {...}`: the node ids, which nodes each removal took and when, and the rollout
workers alive on each node after round 2; then exits with `apo-ray train`'s exit code.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

# This checkout's apo_ray, not an installed one: the script runs from tests/.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from apo_ray.ray_env import driver_source_env

ROLLOUT_NODE = {"num_cpus": 1, "resources": {"rollout_node": 1}}


def rollout_actors() -> list[dict]:
    """The alive rollout workers, each with its node id (from the GCS's actor table)."""
    import ray

    return [
        {"name": a["Name"], "node": a["Address"]["NodeID"]}
        for a in ray._private.state.actors().values()
        if a["Name"].startswith("rollout-") and a["State"] == "ALIVE"
    ]


def node_of_worker(index: int) -> str:
    [actor] = [a for a in rollout_actors() if a["name"].rsplit("-", 1)[1].split(".")[0] == str(index)]
    return actor["node"]


class Faults:
    """The faults, played at the start of rounds' sampling calls (RoundSampler._submit, in the driver's main
    thread) and, while a call runs, from a thread that removes the node of the worker that stalled."""

    def __init__(self, cluster, run_dir: Path, armed: dict[str, Path], observed: dict):
        self.cluster, self.run_dir, self.armed, self.observed = cluster, run_dir, armed, observed
        self.nodes = {node.node_id: node for node in cluster.list_all_nodes()}
        self.removed = threading.Event()
        self.threads: list[threading.Thread] = []

    def before_sampling(self, r: int) -> None:
        if r == 1:
            self._arm("round1", lambda: [node_of_worker(1)], "lost_in_round_1")
        elif r == 2:
            # As an operator would between rounds: a node with the lost one's resources joins, and the run is asked
            # for two workers again (Cluster.add_node needs the main thread).
            if not self.removed.wait(600):
                raise TimeoutError("two-node driver: round 1's node was not removed")
            back = self.cluster.add_node(**ROLLOUT_NODE)
            self.nodes[back.node_id] = back
            self.observed["added_node"] = back.node_id
            subprocess.run([sys.executable, "-m", "apo_ray.cli", "resize", str(self.run_dir), "2"], check=True)
        elif r == 3:
            self.observed["rollout_actors_after_round_2"] = rollout_actors()
            self._arm("round3", self._rollout_nodes_stalled_last, "removed_in_round_3")

    def _rollout_nodes_stalled_last(self) -> list[str]:
        """Every rollout node, the stalled worker 0's last: the other worker is gone by the time worker 0's prompts
        are re-run, so that they find no worker left in this very call."""
        stalled = node_of_worker(0)
        return [n for n in self.nodes if n not in (self.cluster.head_node.node_id, stalled)] + [stalled]

    def _arm(self, fault: str, doomed, key: str) -> None:
        """Arm the stall `fault` (its marker gone, the worker's next generate call stalls and creates it) and
        remove the nodes `doomed()` names once it fires."""
        self.removed.clear()
        self.armed[fault].unlink()

        def remove() -> None:
            deadline = time.monotonic() + 600
            while not self.armed[fault].exists():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"two-node driver: fault {fault} did not fire")
                time.sleep(0.1)
            self.observed[key] = doomed()
            self.observed[f"{key}_at"] = time.time()
            for node_id in self.observed[key]:
                self.cluster.remove_node(self.nodes.pop(node_id))
            self.removed.set()

        thread = threading.Thread(target=remove, daemon=True)
        thread.start()
        self.threads.append(thread)

    def join(self) -> None:
        """Wait for removals under way: the run can stop before the last node is fully gone."""
        for thread in self.threads:
            thread.join(timeout=120)


def main() -> int:
    import ray
    from ray.cluster_utils import Cluster

    from apo_ray.round_samples import RoundSampler
    from apo_ray.train import main as train_main

    run_dir, overrides = Path(sys.argv[1]), sys.argv[2:]
    # The nodes' workers import the apo_ray this script imports, as a local cluster's would (apo_ray.ray_env).
    os.environ.update(driver_source_env())
    armed = {name: run_dir.parent / f"{name}.fired" for name in ("round1", "round3")}
    for marker in armed.values():
        marker.touch()  # present: disarmed; the thread removes it to arm its fault
    os.environ["APO_RAY_INJECT_FAULTS"] = json.dumps(
        [
            {"kind": "stall", "phase": "generate", "worker": 1, "seconds": 3600, "once": str(armed["round1"])},
            {"kind": "stall", "phase": "generate", "worker": 0, "seconds": 3600, "once": str(armed["round3"])},
        ]
    )
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 3, "resources": {"learner_node": 3}, "include_dashboard": False},
    )
    for _ in range(2):
        cluster.add_node(**ROLLOUT_NODE)
    observed: dict = {"head": cluster.head_node.node_id, "nodes": [n.node_id for n in cluster.list_all_nodes()]}
    faults = Faults(cluster, run_dir, armed, observed)
    submit = RoundSampler._submit

    def submit_after_faults(sampler, r):
        faults.before_sampling(r)
        return submit(sampler, r)

    RoundSampler._submit = submit_after_faults
    try:
        code = train_main([f"run_dir={run_dir}", f"ray.address={cluster.address}", *overrides])
    finally:
        faults.join()
        print("OBSERVED " + json.dumps(observed), flush=True)
        ray.shutdown()  # the Cluster refuses to remove the head this driver is connected to
        cluster.shutdown()
    return code


if __name__ == "__main__":
    sys.exit(main())
