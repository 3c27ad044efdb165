"""Starting and stopping the `apo-ray serve` application, and the checks made before anything starts: the
serve config, the bind address and its token, the port."""

from __future__ import annotations

import ipaddress
import json
import os
import socket
from collections.abc import Mapping

from apo_ray.config import ConfigError, ServeConfig, read_config_tree, serve_config_from_dict, with_overrides
from apo_ray.ray_env import driver_source_env
from apo_ray.serve.targets import ServeTargets

APP_NAME = "apo-ray"
MIN_TOKEN_CHARS = 16
# The policy's context unless serve.max_model_len says otherwise: its max_position_embeddings up to this (a
# 32k context would need a KV cache for 32k tokens before the engine starts).
DEFAULT_MAX_MODEL_LEN = 2048


def load_serve_config(path: str | None, run_section: dict, overrides: list[str]) -> ServeConfig:
    """The `serve` section of `path` (a YAML file with a `serve:` key) or else of the run being served, with
    `serve.key=value` overrides on top."""
    section = read_config_tree(path, []).get("serve", {}) if path else run_section
    tree = with_overrides({"serve": section}, overrides)
    unknown = sorted(set(tree) - {"serve"})
    if unknown:
        raise ConfigError(f"{unknown[0]}: not a serve setting; overrides look like serve.port=8001")
    return serve_config_from_dict(tree["serve"])


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve_token(cfg: ServeConfig, environ: Mapping[str, str] = os.environ) -> str | None:
    """The bearer token from cfg.token_env; refuses to go without one off loopback."""
    token = environ.get(cfg.token_env) or None
    if token is None and not is_loopback(cfg.host):
        raise ConfigError(
            f"serve.host: {cfg.host} is reachable from other machines; set a bearer token in "
            f"${cfg.token_env} (at least {MIN_TOKEN_CHARS} characters, e.g. `export {cfg.token_env}="
            f"$(openssl rand -hex 32)`) or bind serve.host=127.0.0.1"
        )
    if token is not None and len(token) < MIN_TOKEN_CHARS:
        raise ConfigError(f"{cfg.token_env}: the token has {len(token)} characters; use at least {MIN_TOKEN_CHARS}")
    return token


def check_port_free(cfg: ServeConfig) -> None:
    with socket.socket() as probe:
        # As Serve's HTTP server binds: connections of an earlier server in TIME_WAIT do not count as taken.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((cfg.host, cfg.port))
        except OSError as exc:
            raise ConfigError(
                f"serve.port: cannot bind {cfg.host}:{cfg.port} ({exc.strerror}); choose another with serve.port=..."
            ) from None


def check_targets(targets: ServeTargets, cfg: ServeConfig) -> ServeConfig:
    """Refuse what the models cannot do; returns cfg with the policy's context length filled in."""
    if targets.policy is None and targets.reward is None:
        raise ConfigError("nothing to serve: no policy or reward model found in the targets")
    if targets.policy is None:
        return cfg
    config = json.loads((targets.policy / "config.json").read_text())
    longest = config.get("max_position_embeddings")
    if longest is not None and cfg.max_model_len is not None and cfg.max_model_len > longest:
        raise ConfigError(
            f"serve.max_model_len: {cfg.max_model_len} is more than the policy's "
            f"max_position_embeddings {longest} ({targets.policy})"
        )
    cfg = cfg.model_copy(
        update={"max_model_len": cfg.max_model_len or min(longest or DEFAULT_MAX_MODEL_LEN, DEFAULT_MAX_MODEL_LEN)}
    )
    limits = cfg.limits
    if limits.max_prompt_tokens + limits.max_tokens > cfg.max_model_len:
        raise ConfigError(
            f"serve.limits.max_prompt_tokens: {limits.max_prompt_tokens} + serve.limits.max_tokens "
            f"{limits.max_tokens} do not fit the policy's context of {cfg.max_model_len} tokens"
        )
    return cfg


def required_resources(targets: ServeTargets, cfg: ServeConfig) -> dict[str, float]:
    """Logical CPUs and GPUs of every replica the application starts."""
    parts = [cfg.ingress] + ([cfg.reward] if targets.reward else []) + ([cfg.policy] if targets.policy else [])
    return {"CPU": sum(p.replicas * p.num_cpus for p in parts), "GPU": sum(p.replicas * p.num_gpus for p in parts)}


def init_ray_for(targets: ServeTargets, cfg: ServeConfig) -> None:
    """Join RAY_ADDRESS's cluster, else start a local one that holds every replica; either way refuse to deploy
    what the cluster cannot hold (Serve would wait for it without end)."""
    import math

    import ray

    need = required_resources(targets, cfg)
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        ray.init(
            num_cpus=max(os.cpu_count() or 1, math.ceil(need["CPU"])),
            include_dashboard=False,
            runtime_env={"env_vars": driver_source_env()},
        )
    have = ray.cluster_resources()
    if any(amount > have.get(kind, 0.0) for kind, amount in need.items()):
        raise ConfigError(
            f"serve: the replicas need {need['CPU']:g} CPUs and {need['GPU']:g} GPUs "
            f"(serve.ingress, serve.reward, serve.policy: replicas x num_cpus / num_gpus); the cluster "
            f"has {have.get('CPU', 0.0):g} and {have.get('GPU', 0.0):g}"
        )


def deploy(targets: ServeTargets, cfg: ServeConfig, token: str | None) -> str:
    """Start Serve's HTTP proxy on cfg.host:cfg.port (Ray must be initialised), deploy the application and wait
    until every replica is up; returns the base URL. cfg has passed check_targets."""
    from ray import serve

    from apo_ray.serve.deployments import build_app

    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(build_app(targets, cfg, token), name=APP_NAME, route_prefix="/")
    return f"http://{cfg.host}:{cfg.port}"


def undeploy() -> None:
    from ray import serve

    serve.delete(APP_NAME)
