"""Starting and stopping the `apo-ray serve` application, and the checks made before anything starts: the
serve config, the bind address and its token, the port."""

from __future__ import annotations

import ipaddress
import os
import socket
from typing import Mapping, Optional

from apo_ray.config import ConfigError, ServeConfig, _merge, parse_overrides, read_config_tree, serve_config_from_dict
from apo_ray.serve.targets import ServeTargets

APP_NAME = "apo-ray"
MIN_TOKEN_CHARS = 16


def load_serve_config(path: Optional[str], run_section: dict, overrides: list[str]) -> ServeConfig:
    """The `serve` section of `path` (a YAML file with a `serve:` key) or else of the run being served, with
    `serve.key=value` overrides on top."""
    tree = read_config_tree(path, []).get("serve", {}) if path else dict(run_section)
    extra = parse_overrides(overrides)
    unknown = sorted(set(extra) - {"serve"})
    if unknown:
        raise ConfigError(f"{unknown[0]}: not a serve setting; overrides look like serve.port=8001")
    return serve_config_from_dict(_merge(tree, extra.get("serve", {})))


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve_token(cfg: ServeConfig, environ: Mapping[str, str] = os.environ) -> Optional[str]:
    """The bearer token from cfg.token_env; refuses to go without one off loopback."""
    token = environ.get(cfg.token_env) or None
    if token is None and not is_loopback(cfg.host):
        raise ConfigError(f"serve.host: {cfg.host} is reachable from other machines; set a bearer token in "
                          f"${cfg.token_env} (at least {MIN_TOKEN_CHARS} characters, e.g. `export {cfg.token_env}="
                          f"$(openssl rand -hex 32)`) or bind serve.host=127.0.0.1")
    if token is not None and len(token) < MIN_TOKEN_CHARS:
        raise ConfigError(f"{cfg.token_env}: the token has {len(token)} characters; use at least {MIN_TOKEN_CHARS}")
    return token


def check_port_free(cfg: ServeConfig) -> None:
    with socket.socket() as probe:
        try:
            probe.bind((cfg.host, cfg.port))
        except OSError as exc:
            raise ConfigError(f"serve.port: cannot bind {cfg.host}:{cfg.port} ({exc.strerror}); choose another "
                              "with serve.port=...") from None


def check_targets(targets: ServeTargets) -> None:
    if targets.policy is None and targets.reward is None:
        raise ConfigError("nothing to serve: no policy or reward model found in the targets")


def deploy(targets: ServeTargets, cfg: ServeConfig, token: Optional[str]) -> str:
    """Start Serve's HTTP proxy on cfg.host:cfg.port (Ray must be initialised), deploy the application and wait
    until every replica is up; returns the base URL."""
    from ray import serve

    from apo_ray.serve.deployments import build_app

    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(build_app(targets, cfg, token), name=APP_NAME, route_prefix="/")
    return f"http://{cfg.host}:{cfg.port}"


def undeploy() -> None:
    from ray import serve

    serve.delete(APP_NAME)
