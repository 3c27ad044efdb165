"""A run on a Ray cluster of several nodes on this machine (tests/two_node_driver.py starts it and plays the faults):
learners pinned to the head by a custom resource, rollout workers to two other nodes. The game runs across them;
a rollout node that dies mid-round costs its worker, whose prompts the other worker answers; a node that joins is
used again after `apo-ray resize`; losing every rollout node stops the run resumably (exit code 8).

All nodes run on one machine, so they share its filesystem: the run's check that run_dir is shared passes here by
construction (docs/cluster.md says what a real cluster needs).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from conftest import SMALL_EVAL
from test_job_submit import SMALL_RUN

from apo_ray.checkpoint import Checkpointer
from apo_ray.metrics import METRICS_FILE, read_metrics_jsonl

DRIVER = Path(__file__).with_name("two_node_driver.py")
# SMALL_RUN's samples_per_prompt, data.builtin.n_prompts (each round's policy prompts) and data.builtin.n_gold.
SAMPLES_PER_PROMPT, POLICY_PROMPTS, GOLD_PROMPTS = 2, 16, 16


def test_two_nodes_lose_a_node_resize_and_lose_all(tmp_path):
    run_dir = tmp_path / "run"
    overrides = [
        *(o for o in SMALL_RUN if not o.startswith("rounds=")),
        *SMALL_EVAL,
        "rounds=3",
        "rollout.num_workers=2",
        "learner.resources={learner_node: 1}",
        "rollout.resources={rollout_node: 1}",
        "logging.report=false",
        # Each round's row is logged in its round, so that round 2's is there when round 3 stops the run.
        "eval.overlap=false",
    ]
    done = subprocess.run(
        [sys.executable, str(DRIVER), str(run_dir), *overrides],
        capture_output=True,
        text=True,
        timeout=1200,
        cwd=Path(__file__).parent,
    )
    output = done.stdout + done.stderr
    [line] = [line for line in done.stdout.splitlines() if line.startswith("OBSERVED ")]
    observed = json.loads(line.removeprefix("OBSERVED "))
    head, [lost], back = observed["head"], observed["lost_in_round_1"], observed["added_node"]

    # The learners wrote their checkpoints where the driver (on the head) reads them.
    assert re.search(r"run_dir is shared with node|every learner .* is on the driver's node", output), output[-3000:]
    # Round 1: the node of worker 1 went away mid-call; the run named the worker and its node and went on.
    assert lost != head
    assert re.search(
        rf"rollout worker rollout-\w+-1 on node {lost} was lost with its node \(the node died\); "
        rf"re-running its \d+ prompts on the 1 workers left \(rollout worker rollout-\w+-0 on node "
        rf"(?!{lost})\w+\)",
        output,
    ), output[-3000:]
    by_round = {row["round"]: row for row in read_metrics_jsonl(run_dir / METRICS_FILE)}
    assert sorted(by_round) == [0, 1, 2]
    # Every prompt answered exactly once: the round's policy and gold prompts (the RM step opens every round), each
    # sampled samples_per_prompt times; the pool also checks each prompt's count.
    for r in (1, 2):
        assert by_round[r]["rollout/samples"] == SAMPLES_PER_PROMPT * (POLICY_PROMPTS + GOLD_PROMPTS), by_round[r]
    assert by_round[1]["rollout/workers_lost"] == 1 and by_round[1]["rollout/num_workers"] == 2
    assert by_round[2]["rollout/workers_lost"] == 0
    # Round 2: the node that joined holds the worker the resize added, and it sampled with the other.
    assert re.search(r"rollout pool: 1 -> 2 workers for round 2's samples \(apo-ray resize request\)", output)
    assert re.search(rf"rollout pool: added rollout worker rollout-\w+-1\.1 on node {back}", output), output[-3000:]
    assert by_round[2]["rollout/num_workers"] == 2
    [survivor] = [n for n in observed["nodes"] if n not in (head, lost)]
    assert sorted(a["node"] for a in observed["rollout_actors_after_round_2"]) == sorted([back, survivor])
    assert sorted(observed["removed_in_round_3"]) == sorted([back, survivor])
    # Round 3: both rollout nodes went away; the run stopped with the code of its own, naming the round to resume.
    assert done.returncode == 8, output[-3000:]
    # Each of the two workers is named lost with its node; the second finds no worker left.
    assert re.search(rf"rollout worker rollout-\w+-1\.1 on node {back} was lost with its node", output)
    assert re.search(rf"rollout worker rollout-\w+-0 on node {survivor} was lost with its node", output)
    assert re.search(r"was lost with its node \(the node died\); no worker is left", output), output[-3000:]
    assert re.search(
        r"every rollout worker was lost with its node \(rollout worker .*\): .*The checkpoint of "
        rf"round 2 is intact: continue with `apo-ray train --resume {re.escape(str(run_dir))}`",
        output,
    )
    assert Checkpointer(run_dir).latest_round() == 2
