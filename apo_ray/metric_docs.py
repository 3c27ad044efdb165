"""docs/metrics.md and the Grafana dashboard docs/grafana/apo_ray.json, both generated from the metric catalog
(apo_ray/metric_catalog.py). `python -m apo_ray.metric_docs --write docs` writes them; `--check docs` fails when
either is stale (tests/test_metric_catalog.py checks the same)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from apo_ray.metric_catalog import CATALOG, VIEWS, shown_in
from apo_ray.metrics import PHASE_GAUGE, prometheus_name

COMMAND = "python -m apo_ray.metric_docs --write docs"
MARKDOWN, DASHBOARD = Path("metrics.md"), Path("grafana") / "apo_ray.json"
# Ray's metrics agent prefixes every application metric on its Prometheus endpoint.
RAY_PREFIX = "ray_"

_INTRO = f"""# Metrics

Generated from apo_ray/metric_catalog.py by `{COMMAND}`; edit the catalog, not this page.

Every round logs its metrics to `metrics.jsonl` (and TensorBoard, and wandb when set). A key with `{{...}}` stands for
a family of keys; any key's standard error is logged beside it as `<key>_se`. *Ranks*: how a learner's ranks
combine one step's value (`sum`: each rank logs its part of the minibatch's mean). *Shown in*: the round line of a
policy step (`line:offline`, ...), the Ray dashboard gauges (`dashboard`), the report's table and plots, the run
summary.

## The Ray dashboard and Grafana

With `logging.ray_metrics` (on by default) the driver exports the `dashboard` keys as Ray application metrics,
named `{RAY_PREFIX}apo_<key>` with every character outside `[A-Za-z0-9_]` as `_`, and the running phase as
`{RAY_PREFIX}{PHASE_GAUGE}{{phase=...}}`, each tagged `run=<run name>`, on every node's metrics endpoint
(docs/cluster.md, "Watch it"). Nothing scrapes that endpoint by itself: a user starts Prometheus
(`ray metrics launch-prometheus` scrapes the local Ray cluster) and Grafana, and imports
`docs/grafana/apo_ray.json` (Dashboards > New > Import) with that Prometheus as its data source. Ray's own
dashboard embeds the panels of Ray's dashboards once `RAY_GRAFANA_HOST` and `RAY_PROMETHEUS_HOST` are set when the
cluster starts; apo-ray's dashboard is opened in Grafana beside them. This dashboard has not been checked against a
running Grafana in this repository's tests: they check that its queries name the gauges the driver exports.

## Keys

| key | meaning | ranks | shown in |
| --- | --- | --- | --- |
"""


def markdown() -> str:
    rows = [
        f"| `{m.key}` | {m.description.replace('|', chr(92) + '|')} | {m.ranks} | "
        f"{', '.join(v for v in VIEWS if v in m.shown)} |"
        for m in CATALOG
    ]
    return _INTRO + "\n".join(rows) + "\n"


def _panel(number: int, title: str, expr: str, legend: str, description: str, kind: str = "timeseries") -> dict:
    return {
        "id": number + 1,
        "type": kind,
        "title": title,
        "description": description,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"h": 8, "w": 12, "x": 12 * (number % 2), "y": 8 * (number // 2)},
        "targets": [
            {
                "refId": "A",
                "expr": expr,
                "legendFormat": legend,
                "datasource": {"type": "prometheus", "uid": "${datasource}"},
            }
        ],
    }


def grafana_dashboard() -> dict:
    """A Grafana dashboard of the catalog's dashboard gauges, one panel each, and the running phase."""
    described = {m.key: m.description for m in CATALOG}
    run = '{run=~"$run"}'
    panels = [
        _panel(
            0,
            "phase",
            f"{RAY_PREFIX}{PHASE_GAUGE}{run} == 1",
            "{{phase}}",
            "The phase the run is in (1 while it runs).",
            kind="state-timeline",
        )
    ]
    for key in shown_in("dashboard"):
        panels.append(_panel(len(panels), key, f"{RAY_PREFIX}{prometheus_name(key)}{run}", "{{run}}", described[key]))
    return {
        "uid": "apo-ray",
        "title": "apo-ray",
        "tags": ["apo-ray", "ray"],
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {
            "list": [
                {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Prometheus"},
                {
                    "name": "run",
                    "type": "query",
                    "label": "run",
                    "includeAll": True,
                    "multi": True,
                    "refresh": 2,
                    "datasource": {"type": "prometheus", "uid": "${datasource}"},
                    "query": f"label_values({RAY_PREFIX}{prometheus_name('round')}, run)",
                },
            ]
        },
        "panels": panels,
    }


def documents() -> dict[Path, str]:
    """{path under docs/: text} of every generated file."""
    return {MARKDOWN: markdown(), DASHBOARD: json.dumps(grafana_dashboard(), indent=2) + "\n"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m apo_ray.metric_docs", description="write or check docs/metrics.md and docs/grafana/apo_ray.json"
    )
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--write", type=Path, metavar="DOCS", help="write them under DOCS")
    action.add_argument("--check", type=Path, metavar="DOCS", help="exit 1 if those under DOCS differ")
    args = parser.parse_args(argv)
    stale = []
    for path, text in documents().items():
        if args.write is not None:
            (args.write / path).parent.mkdir(parents=True, exist_ok=True)
            (args.write / path).write_text(text)
        elif not (args.check / path).is_file() or (args.check / path).read_text() != text:
            stale.append(str(args.check / path))
    if stale:
        print(f"{', '.join(stale)} stale: run `{COMMAND}`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
