"""`apo-ray serve` past its capacity, on loopback: what clients see when more requests arrive than the RM's replica
can score, with its queue bounded (`serve.reward.max_queued_requests`) and unbounded (-1), and when the replica
is killed in the middle of the load.

- overload: `--clients` concurrent clients (more than the replica runs at once, 2 x serve.score_max_batch_size)
  send `--requests` /score requests, each waiting at most `--client-timeout-s`. A bounded queue should answer
  the surplus with 503 and Retry-After at once; an unbounded one makes it wait, past the clients' time-out.
- replica killed: a gentler load on the bounded deployment; `--kill-after-s` into it the RM's replica is killed.
  Its requests in flight should get a retryable 503 (Retry-After), and Serve should start another replica:
  the seconds from the kill to the next 200 are reported.

Served: the MiniLM RM of `benchmarks.serve_load` (the real backbone with a fresh head), one replica, on
127.0.0.1, HH dev texts; the script starts its own local Ray cluster and sends requests there only, in phases
bounded in count and time.

    .venv/bin/python -m benchmarks.serve_overload [--quick] [--clients 48] [--requests 240] [--queue 8]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import sys
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS_ROOT, SCRATCH_DIR, BenchmarkRun, start_local_ray, timed
from benchmarks.serve_load import checked_load_args, default_targets, free_port, load, load_parser, score_texts


def parse_args() -> argparse.Namespace:
    parser = load_parser(__doc__.split("\n\n")[0], clients=48, requests=240, batch=4, deadline_s=300.0)
    parser.add_argument("--queue", type=int, default=8, help="serve.reward.max_queued_requests of the bounded arm")
    parser.add_argument("--client-timeout-s", type=float, default=10.0, help="each request's client-side time-out")
    parser.add_argument("--kill-after-s", type=float, default=3.0, help="seconds into the kill phase's load")
    args = parser.parse_args()
    if args.quick:
        args.clients, args.requests, args.queue = 12, 36, 2
    return checked_load_args(parser, args)


def kill_reward_replica() -> str:
    """Kill the RM's one replica as a crash would (no restart of that actor: Serve must start another)."""
    import ray

    [replica] = [
        a
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith("SERVE_REPLICA::") and "#reward#" in a["name"]
    ]
    ray.kill(ray.get_actor(replica["name"], namespace=replica["namespace"]), no_restart=True)
    return replica["name"]


def first_200_after(url: str, since: float, deadline_s: float) -> float | None:
    """Seconds from `since` until a /score request is answered 200 again (None past the deadline)."""
    import httpx

    while time.perf_counter() - since < deadline_s:
        try:
            if httpx.post(url + "/score", json=[score_texts()[0]], timeout=30).status_code == 200:
                return time.perf_counter() - since
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    return None


def main() -> int:
    args = parse_args()
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise
    run = BenchmarkRun("serve_overload", "apo-ray serve past capacity and with a replica killed, on loopback", args)
    import ray
    from ray import serve

    from apo_ray.serve.app import check_targets, deploy, load_serve_config, required_resources
    from apo_ray.serve.targets import resolve_targets

    rm_only = RESULTS_ROOT / "serve" / SCRATCH_DIR / "scratch" / "rm_only"
    if not (rm_only / "reward").exists():
        rm_only.mkdir(parents=True, exist_ok=True)
        (rm_only / "reward").symlink_to((Path(default_targets(rm_only.parent)[0]) / "reward").resolve())
    targets = resolve_targets([str(rm_only)])
    rng = random.Random(0)
    texts = score_texts()
    payloads = [[rng.choice(texts) for _ in range(args.score_items)] for _ in range(args.requests)]

    def config(queue: int):
        return check_targets(
            targets,
            load_serve_config(
                None,
                targets.serve_section,
                [
                    f"serve.port={free_port()}",
                    "serve.host=127.0.0.1",
                    "serve.ingress.num_cpus=0.5",
                    f"serve.limits.max_score_items={args.score_items}",
                    f"serve.score_max_batch_size={args.batch}",
                    f"serve.reward.max_queued_requests={queue}",
                ],
            ),
        )

    start_local_ray(max(2, int(required_resources(targets, config(args.queue))["CPU"]) + 1))
    phases: list[dict[str, Any]] = []
    for arm, queue in ((f"queue {args.queue}", args.queue), ("queue unbounded", -1)):
        url = deploy(targets, config(queue), token=None)
        with timed() as t:
            phase = asyncio.run(
                load(url, "/score", payloads, args.clients, args.phase_deadline_s, arm, timeout_s=args.client_timeout_s)
            )
        phases.append({"arm": arm, **phase.summary(), "timing": t.timing.to_dict()})
        print(f"  [{arm}] statuses {phase.statuses}, client failures {dict(phase.failures)}", flush=True)
        serve.shutdown()

    url = deploy(targets, config(args.queue), token=None)
    killed: dict[str, Any] = {}

    def killer() -> None:
        time.sleep(args.kill_after_s)
        killed["replica"], killed["at"] = kill_reward_replica(), time.perf_counter()
        killed["back_after_s"] = first_200_after(url, killed["at"], 120.0)

    thread = threading.Thread(target=killer)
    thread.start()
    with timed() as t:
        phase = asyncio.run(
            load(
                url,
                "/score",
                payloads[: max(args.clients, args.requests // 3)],
                max(1, args.clients // 4),
                args.phase_deadline_s,
                "replica killed",
                timeout_s=args.client_timeout_s,
            )
        )
    thread.join()
    phases.append(
        {
            "arm": "replica killed",
            **phase.summary(),
            "timing": t.timing.to_dict(),
            "killed": killed["replica"],
            "back_after_s": killed["back_after_s"],
        }
    )
    print(
        f"  [replica killed] statuses {phase.statuses}; a 200 again {killed['back_after_s']} s after the kill",
        flush=True,
    )
    serve.shutdown()
    ray.shutdown()
    run.finish(summarize(args, run, phases))
    return 0


def summarize(args, run: BenchmarkRun, phases: list[dict]) -> dict[str, Any]:
    run.add_text(
        f"One RM replica (MiniLM) running {2 * args.batch} /score requests at once (serve.score_max_batch_size "
        f"{args.batch}); {args.clients} concurrent clients send {args.requests} requests of {args.score_items} items, "
        f"each waiting at most {args.client_timeout_s:g} s; the kill phase sends a third of them from a quarter of "
        f"the clients and kills the replica {args.kill_after_s:g} s in. Clients and server share the machine's CPUs."
    )
    rows = []
    for p in phases:
        statuses = p["statuses"]
        rows.append(
            [
                p["arm"],
                statuses.get(200, 0),
                statuses.get(503, 0),
                p["with_retry_after"].get(503, 0),
                sum(n for s, n in statuses.items() if s >= 500 and s != 503),
                sum(p["client_failures"].values()),
                p["slowest_s_by_status"].get(503),
                p["slowest_s_by_status"].get(200),
                p.get("back_after_s"),
                p["timing"]["load_start"],
                p["timing"]["load_end"],
            ]
        )
    run.add_table(
        "What clients got",
        [
            "phase",
            "200",
            "503",
            "503 with Retry-After",
            "other 5xx",
            "client time-outs and errors",
            "slowest 503 s",
            "slowest 200 s",
            "200 again after the kill, s",
            "load start",
            "load end",
        ],
        rows,
    )
    return {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "phases": phases}


if __name__ == "__main__":
    sys.exit(main())
