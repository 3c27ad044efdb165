"""`apo-ray serve` under load on loopback: latency (p50, p99) and requests/s of POST /score and POST /generate, and
the batching gain of /score (`serve.score_max_batch_size` N against 1).

The script starts a local Ray cluster and the application on 127.0.0.1 itself and sends requests there only.
Every phase is bounded: a fixed number of requests from a fixed number of concurrent clients (at most
MAX_CLIENTS and MAX_REQUESTS), a per-request timeout and a deadline per phase; then the script stops. The /score
arms (batch 1 and batch N, switched by Serve's user_config without restarting the replicas) alternate over the
repeats (1 N, N 1, ...), each followed by a /generate phase; each phase follows an unrecorded warm-up of one
request per client. Any 5xx is counted and makes the exit code 1.

Models: the MiniLM RM (the real backbone with a fresh head: the weights do not change the cost) and the
embedded default's tiny policy, unless --target names run or model directories (as `apo-ray serve` takes them).
/score texts are HH-RLHF dev pairs from data/hh_harmless (left-truncated to 256 tokens).

    .venv/bin/python -m benchmarks.serve_load [--quick] [--clients 16] [--requests 200] [--repeats 3] [--batch 16]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import math
import random
import socket
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from benchmarks.common import REPO_ROOT, RESULTS_ROOT, SCRATCH_DIR, BenchmarkRun, ratio_summary, start_local_ray, timed

DATA_DIR = REPO_ROOT / "data" / "hh_harmless"
MAX_CLIENTS = 64
MAX_REQUESTS = 5000
REQUEST_TIMEOUT_S = 120.0


def load_parser(
    description: str, *, clients: int, requests: int, batch: int, deadline_s: float
) -> argparse.ArgumentParser:
    """The options every loopback load test of `apo-ray serve` takes (this one and serve_overload)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="a small smoke run; writes under results/serve/tmp/")
    parser.add_argument("--out", type=Path, help="results directory (default: benchmarks/results/serve)")
    parser.add_argument("--clients", type=int, default=clients, help=f"concurrent clients (at most {MAX_CLIENTS})")
    parser.add_argument("--requests", type=int, default=requests, help=f"requests per phase (at most {MAX_REQUESTS})")
    parser.add_argument("--batch", type=int, default=batch, help="serve.score_max_batch_size")
    parser.add_argument("--score-items", type=int, default=4, help="{prompt, response} items per /score request")
    parser.add_argument("--phase-deadline-s", type=float, default=deadline_s, help="a phase stops sending after this")
    return parser


def checked_load_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Bounded load only; a quick run writes beside the results, where git ignores it."""
    if not 1 <= args.clients <= MAX_CLIENTS or not 1 <= args.requests <= MAX_REQUESTS:
        parser.error(f"--clients must be 1-{MAX_CLIENTS} and --requests 1-{MAX_REQUESTS}")
    if args.out is None:
        args.out = RESULTS_ROOT / "serve" / (SCRATCH_DIR if args.quick else "")
    return args


def parse_args() -> argparse.Namespace:
    parser = load_parser(__doc__.split("\n\n")[0], clients=16, requests=200, batch=16, deadline_s=600.0)
    parser.add_argument("--target", nargs="+", help="run or model directories to serve instead of the default models")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of (score batch 1, score batch N, generate)")
    parser.add_argument("--max-tokens", type=int, default=32, help="max_tokens of each /generate request")
    parser.add_argument(
        "--max-prompt-tokens",
        type=int,
        default=64,
        help="serve.limits.max_prompt_tokens (with max_tokens within the policy's context)",
    )
    args = parser.parse_args()
    if args.quick:
        args.clients, args.requests, args.repeats = min(args.clients, 4), min(args.requests, 12), 1
        args.score_items, args.max_tokens, args.batch = min(args.score_items, 2), min(args.max_tokens, 8), 4
    return checked_load_args(parser, args)


# ---------------------------------------------------------------------------------------------- models and data


def default_targets(scratch: Path) -> list[str]:
    """A round-checkpoint-like directory: the builtin tiny policy (linked) and the MiniLM backbone saved once as a
    sequence classifier with a fresh 1-output head (as `apo-ray rm` starts from it)."""
    from benchmarks.tiny_models import builtin_policy_dir, minilm_dir

    round_dir = scratch / "default_models"
    round_dir.mkdir(parents=True, exist_ok=True)
    if not (round_dir / "policy").exists():
        (round_dir / "policy").symlink_to(Path(builtin_policy_dir()).resolve(), target_is_directory=True)
    if not (round_dir / "reward" / "config.json").exists():
        import torch

        from apo_ray.modeling import load_reward_model, load_tokenizer

        torch.manual_seed(0)
        load_reward_model(str(minilm_dir()), "float32").save_pretrained(round_dir / "reward")
        load_tokenizer(str(minilm_dir())).save_pretrained(round_dir / "reward")
    return [str(round_dir)]


def score_texts() -> list[dict[str, str]]:
    if (DATA_DIR / "dev.jsonl").is_file():
        from apo_ray.data import load_hh_pairs

        pairs = load_hh_pairs(str(DATA_DIR / "dev.jsonl"))
    else:
        from apo_ray.builtin.task import make_task

        pairs = list(make_task(0, n_eval_pairs=200).eval_pairs)
    # The tail of each dialogue: what the RM reads after left truncation, within the request size limits.
    return [{"prompt": p.prompt[-4000:], "response": p.chosen[-4000:]} for p in pairs]


def generate_prompts() -> list[str]:
    from apo_ray.builtin.task import all_prompts

    return all_prompts()


# ---------------------------------------------------------------------------------------------- load


@dataclasses.dataclass
class Phase:
    name: str
    latencies_s: list[float]
    statuses: Counter
    failures: Counter  # client-side: timeouts, refused connections
    wall_s: float
    # Per status: answers that carried a Retry-After header, and the slowest answer (s).
    retry_after: Counter = dataclasses.field(default_factory=Counter)
    slowest_s: dict = dataclasses.field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        ordered = sorted(self.latencies_s)
        pick = (lambda q: ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]) if ordered else None
        return {
            "requests": len(ordered) + sum(self.failures.values()),
            "completed": len(ordered),
            "requests_per_s": len(ordered) / self.wall_s if self.wall_s else None,
            "p50_ms": 1e3 * pick(0.50) if ordered else None,
            "p99_ms": 1e3 * pick(0.99) if ordered else None,
            "mean_ms": 1e3 * statistics.fmean(ordered) if ordered else None,
            "statuses": dict(self.statuses),
            "5xx": sum(n for status, n in self.statuses.items() if status >= 500),
            "client_failures": dict(self.failures),
            "wall_s": self.wall_s,
            "with_retry_after": dict(self.retry_after),
            "slowest_s_by_status": dict(self.slowest_s),
        }


async def load(
    url: str,
    path: str,
    payloads: list[Any],
    clients: int,
    deadline_s: float,
    name: str,
    timeout_s: float = REQUEST_TIMEOUT_S,
) -> Phase:
    """Send every payload once from `clients` concurrent connections, each request waiting at most `timeout_s`;
    stop sending at the deadline."""
    import httpx

    latencies: list[float] = []
    statuses: Counter = Counter()
    failures: Counter = Counter()
    retry_after: Counter = Counter()
    slowest: dict[int, float] = {}
    pending = iter(payloads)
    started = time.perf_counter()

    async def client(http: httpx.AsyncClient) -> None:
        for payload in pending:
            if time.perf_counter() - started > deadline_s:
                failures["deadline"] += 1
                continue
            sent = time.perf_counter()
            try:
                answer = await http.post(url + path, json=payload)
            except httpx.HTTPError as error:
                failures[type(error).__name__] += 1
                continue
            latencies.append(time.perf_counter() - sent)
            statuses[answer.status_code] += 1
            retry_after[answer.status_code] += "retry-after" in answer.headers
            slowest[answer.status_code] = max(slowest.get(answer.status_code, 0.0), latencies[-1])

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    return Phase(name, latencies, statuses, failures, time.perf_counter() - started, retry_after, slowest)


def warm_up(url: str, path: str, payloads: list[Any], clients: int) -> None:
    """One unrecorded round of `clients` requests: first calls pay for connection set-up and lazy
    initialisation in the replicas."""
    asyncio.run(load(url, path, payloads[:clients], clients, REQUEST_TIMEOUT_S, "warm-up"))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ---------------------------------------------------------------------------------------------- run


def main() -> int:
    args = parse_args()
    run = BenchmarkRun("serve_load", "apo-ray serve under load on loopback: /score (batch 1 vs N) and /generate", args)
    import ray
    from ray import serve

    from apo_ray.serve.app import APP_NAME, check_targets, deploy, load_serve_config, required_resources
    from apo_ray.serve.targets import resolve_targets

    # Git-ignored, beside the results: the RM made from the MiniLM backbone.
    scratch = RESULTS_ROOT / "serve" / SCRATCH_DIR / "scratch"
    targets = resolve_targets(args.target or default_targets(scratch))
    base = check_targets(
        targets,
        load_serve_config(
            None,
            targets.serve_section,
            [
                f"serve.port={free_port()}",
                "serve.host=127.0.0.1",
                "serve.ingress.num_cpus=0.5",
                f"serve.limits.max_score_items={max(args.score_items, 1)}",
                f"serve.limits.max_tokens={args.max_tokens}",
                f"serve.limits.max_prompt_tokens={args.max_prompt_tokens}",
            ],
        ),
    )
    start_local_ray(max(2, math.ceil(required_resources(targets, base)["CPU"])))
    rng = random.Random(0)
    texts, prompts = score_texts(), generate_prompts()
    score_payloads = [[rng.choice(texts) for _ in range(args.score_items)] for _ in range(args.requests)]
    generate_payloads = [
        {"prompt": rng.choice(prompts), "max_tokens": args.max_tokens, "temperature": 1.0, "seed": i}
        for i in range(args.requests)
    ]
    arms = {"score, batch 1": 1, f"score, batch {args.batch}": args.batch}
    score_arms = list(arms) if targets.reward is not None else []
    phases: list[dict[str, Any]] = []
    url = None
    for repeat in range(args.repeats):
        for arm in score_arms if repeat % 2 == 0 else score_arms[::-1]:
            cfg = base.model_copy(update={"score_max_batch_size": arms[arm]})
            url = deploy(targets, cfg, token=None)
            warm_up(url, "/score", score_payloads, args.clients)
            before = serve.get_deployment_handle("reward", APP_NAME).batch_stats.remote().result()
            with timed() as t:
                phase = asyncio.run(load(url, "/score", score_payloads, args.clients, args.phase_deadline_s, arm))
            after = serve.get_deployment_handle("reward", APP_NAME).batch_stats.remote().result()
            batches = {size: after.get(size, 0) - before.get(size, 0) for size in after}
            n_batches = sum(batches.values())
            phases.append(
                {
                    "arm": arm,
                    "repeat": repeat,
                    **phase.summary(),
                    "timing": t.timing.to_dict(),
                    "mean_requests_per_batch": sum(s * n for s, n in batches.items()) / n_batches
                    if n_batches
                    else None,
                }
            )
            print(
                f"  [{arm} #{repeat}] {phases[-1]['requests_per_s']:.1f} req/s, p50 {phases[-1]['p50_ms']:.0f} ms",
                flush=True,
            )
        if targets.policy is not None:
            url = url or deploy(targets, base, token=None)
            warm_up(url, "/generate", generate_payloads, args.clients)
            with timed() as t:
                phase = asyncio.run(
                    load(url, "/generate", generate_payloads, args.clients, args.phase_deadline_s, "generate")
                )
            phases.append({"arm": "generate", "repeat": repeat, **phase.summary(), "timing": t.timing.to_dict()})
            print(f"  [generate #{repeat}] {phases[-1]['requests_per_s']:.1f} req/s", flush=True)
    serve.shutdown()
    ray.shutdown()
    results = summarize(args, run, targets, base, phases, list(arms))
    run.finish(results)
    return 1 if results["total_5xx"] else 0


def summarize(args, run: BenchmarkRun, targets, cfg, phases: list[dict], score_arms: list[str]) -> dict[str, Any]:
    by_arm = {arm: [p for p in phases if p["arm"] == arm] for arm in [*score_arms, "generate"]}
    by_arm = {arm: rows for arm, rows in by_arm.items() if rows}
    total_5xx = sum(p["5xx"] for p in phases)
    gain = None
    if all(arm in by_arm for arm in score_arms):
        gain = ratio_summary(
            [p["requests_per_s"] for p in by_arm[score_arms[1]]], [p["requests_per_s"] for p in by_arm[score_arms[0]]]
        )
    run.add_text(
        f"Served: policy `{targets.policy}`, RM `{targets.reward}` (RM max_length "
        f"{cfg.reward_max_length or targets.reward_max_length or 256}), one replica each, on 127.0.0.1. Load: "
        f"{args.clients} concurrent clients (httpx, one process), {args.requests} requests per phase, "
        f"{args.score_items} items per /score request, /generate max_tokens {args.max_tokens} at temperature 1; "
        f"{args.repeats} repeat(s), /score arms alternating. Clients and server share the machine's CPUs."
    )
    rows = []
    for arm, rows_of_arm in by_arm.items():
        rows.append(
            [
                arm,
                len(rows_of_arm),
                statistics.median(p["requests_per_s"] for p in rows_of_arm),
                statistics.median(p["p50_ms"] for p in rows_of_arm),
                statistics.median(p["p99_ms"] for p in rows_of_arm),
                statistics.median(p.get("mean_requests_per_batch") or 1 for p in rows_of_arm)
                if arm != "generate"
                else None,
                sum(p["5xx"] for p in rows_of_arm),
                sum(sum(p["client_failures"].values()) for p in rows_of_arm),
            ]
        )
    note = f"5xx in all phases: {total_5xx}."
    if gain:
        note += (
            f" Batching gain ({score_arms[1]} / {score_arms[0]} requests/s, per repeat): median "
            f"{gain['median']:.2f} (range {gain['min']:.2f}-{gain['max']:.2f})."
        )
    run.add_table(
        "Latency and throughput (medians over repeats)",
        ["phase", "repeats", "requests/s", "p50 ms", "p99 ms", "requests per RM batch", "5xx", "client failures"],
        rows,
        note=note,
    )
    run.add_table(
        "Phases (run order)",
        ["phase", "repeat", "requests/s", "p50 ms", "p99 ms", "statuses", "load start", "load end"],
        [
            [
                p["arm"],
                p["repeat"],
                p["requests_per_s"],
                p["p50_ms"],
                p["p99_ms"],
                str(p["statuses"]),
                p["timing"]["load_start"],
                p["timing"]["load_end"],
            ]
            for p in phases
        ],
    )
    return {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "served": {"policy": str(targets.policy), "reward": str(targets.reward)},
        "phases": phases,
        "batching_gain": gain,
        "total_5xx": total_5xx,
    }


if __name__ == "__main__":
    sys.exit(main())
