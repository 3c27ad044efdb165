"""`apo-ray serve TARGET... [--config FILE] [serve.key=value ...]`: the policy and RM over HTTP (Ray Serve).

Runs until interrupted (Ctrl-C or SIGTERM), then deletes the application. Exit code 2 for bad input
(targets, config, a non-loopback host without a token, a taken port), before Ray starts.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from apo_ray.config import ConfigError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="apo-ray serve",
        description="serve a run's policy (POST /generate and OpenAI's /v1/chat/completions, "
        "/v1/completions, /v1/models) and RM (POST /score) with Ray Serve",
    )
    parser.add_argument(
        "items",
        nargs="+",
        metavar="TARGET|serve.key=value",
        help="run directories (apo-ray train / sft / rm), round checkpoints, HF model directories "
        "or GGUF files (a path or pkg:<package>/<file>); "
        "then overrides such as serve.port=8001 serve.reward.replicas=2",
    )
    parser.add_argument("--config", help="YAML file whose `serve:` section replaces the run's")
    return parser


def main(argv: list[str] | None = None) -> int:
    from apo_ray.serve.app import (
        check_port_free,
        check_targets,
        deploy,
        init_ray_for,
        load_serve_config,
        serve_token,
        undeploy,
    )
    from apo_ray.serve.deployments import POLICY_MODEL_ID
    from apo_ray.serve.targets import resolve_targets

    args = build_parser().parse_args(argv)
    paths = [item for item in args.items if "=" not in item]
    overrides = [item for item in args.items if "=" in item]
    try:
        targets = resolve_targets(paths)
        cfg = check_targets(targets, load_serve_config(args.config, targets.serve_section, overrides))
        token = serve_token(cfg)
        check_port_free(cfg)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    try:
        init_ray_for(targets, cfg)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"[serve] deploying policy={targets.policy} reward={targets.reward} ...", flush=True)
    url = deploy(targets, cfg, token)
    auth = f' -H "Authorization: Bearer ${cfg.token_env}"' if token else ""
    print(
        f"[serve] ready at {url}: GET /healthz"
        + (", POST /score" if targets.reward else "")
        + (
            ", POST /generate, OpenAI's POST /v1/chat/completions, POST /v1/completions, GET /v1/models (model "
            f'"{POLICY_MODEL_ID}")'
            if targets.policy
            else ""
        )
        + f'\n  curl -s {url}/score{auth} -d \'[{{"prompt": "Hi", "response": " Hello"}}]\''
        + f'\n  curl -s {url}/generate{auth} -d \'{{"prompt": "Hi", "max_tokens": 16}}\''
        + f"\n  curl -s {url}/v1/chat/completions{auth} -H 'Content-Type: application/json' -d '{{\"model\": "
        f'"{POLICY_MODEL_ID}", "messages": [{{"role": "user", "content": "Hi"}}]}}\'',
        flush=True,
    )
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    stop.wait()
    print("[serve] stopping ...", flush=True)
    undeploy()
    return 0
