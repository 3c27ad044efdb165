"""Run report: PNG plots of the game per round and a Markdown summary, from a run's metrics.jsonl."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

# Figure draws with the Agg canvas without touching pyplot's global backend.
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from apo_ray.evaluation import rise_line, score_rise
from apo_ray.metric_catalog import STDERR_SUFFIX, shown_in
from apo_ray.metrics import METRICS_FILE, read_metrics_jsonl

REPORT_DIR = "report"
SUMMARY_FILE = "summary.json"

# The keys of the table, the timing plot and the sibling games' columns (AAPA, APL: in the table when a run
# records them, never reported missing) are the metric catalog's views.
TIMING_KEYS = shown_in("timings")
TABLE_KEYS = shown_in("table")
GAME_TABLE_KEYS = shown_in("game_table")

Rounds = list[dict[str, Any]]


def load_rounds(run_dir: Path) -> Rounds:
    """One dict per round, in round order; rows logged for the same round are merged, later values winning.

    A row's round is its "round" key, or its "step" when it has none.
    """
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {METRICS_FILE} in run directory {run_dir}")
    merged: dict[int, dict[str, Any]] = {}
    for row in read_metrics_jsonl(path):
        number = row.get("round", row["step"])
        if isinstance(number, bool) or not isinstance(number, int):
            raise ValueError(f"{path}: 'round' must be an integer, got {number!r} at step {row['step']}")
        merged.setdefault(number, {}).update(row)
        merged[number]["round"] = number
    if not merged:
        raise ValueError(f"{path}: no metrics logged")
    return [merged[number] for number in sorted(merged)]


def _series(rounds: Rounds, key: str) -> tuple[list[Any], list[float]]:
    points = [(row["round"], row[key]) for row in rounds if row.get(key) is not None]
    return [x for x, _ in points], [y for _, y in points]


def _has_any(rounds: Rounds, keys: Sequence[str]) -> bool:
    return any(row.get(key) is not None for row in rounds for key in keys)


def _new_axes(title: str, ylabel: str, figsize: tuple[float, float] = (6.4, 4.0)):
    figure = Figure(figsize=figsize, dpi=110, layout="constrained")
    axes = figure.add_subplot()
    axes.set_title(title)
    axes.set_ylabel(ylabel)
    _style_round_axis(axes)
    return figure, axes


def _style_round_axis(axes) -> None:
    axes.set_xlabel("round")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.grid(alpha=0.3)


def _line_plot(
    rounds: Rounds, path: Path, *, lines: dict[str, str], title: str, ylabel: str, chance_level: float | None = None
) -> None:
    figure, axes = _new_axes(title, ylabel)
    for label, key in lines.items():
        xs, ys = _series(rounds, key)
        if xs:
            axes.plot(xs, ys, marker="o", label=f"{label} ({key})")
    if chance_level is not None:
        axes.axhline(chance_level, color="grey", linestyle="--", linewidth=1, label="chance")
    axes.legend()
    figure.savefig(path)


def _error_bar_plot(rounds: Rounds, path: Path, *, lines: dict[str, str], title: str, ylabel: str) -> None:
    """Each key per round with +-1 standard error (its `<key>_se`, where recorded)."""
    figure, axes = _new_axes(title, ylabel)
    for label, key in lines.items():
        points = [(row["round"], row[key], row.get(key + STDERR_SUFFIX)) for row in rounds if row.get(key) is not None]
        if points:
            errors = [e if e is not None and e == e else 0.0 for _, _, e in points]  # NaN (one sample): no bar
            axes.errorbar(
                [x for x, _, _ in points],
                [y for _, y, _ in points],
                yerr=errors,
                marker="o",
                capsize=3,
                label=f"{label} ({key})",
            )
    axes.legend()
    figure.savefig(path)


def _plot_scores(rounds: Rounds, path: Path) -> None:
    # Two y axes: gold and RM scores live on unrelated scales; the plot is about whether they move together.
    figure, gold_axes = _new_axes("Policy samples: gold vs. RM score", "gold score")
    rm_axes = gold_axes.twinx()
    rm_axes.set_ylabel("RM score")
    handles = []
    for axes, key, label, color in (
        (gold_axes, "eval/gold_score", "gold score", "tab:green"),
        (rm_axes, "eval/rm_score", "RM score", "tab:purple"),
    ):
        xs, ys = _series(rounds, key)
        if xs:
            handles += axes.plot(xs, ys, marker="o", color=color, label=f"{label} ({key})")
            axes.yaxis.label.set_color(color)
    gold_axes.legend(handles=handles)
    figure.savefig(path)


def _plot_timings(rounds: Rounds, path: Path) -> None:
    figure, axes = _new_axes("Time per round by phase", "seconds")
    numbers = [row["round"] for row in rounds]
    bottom = [0.0] * len(rounds)
    for key in TIMING_KEYS:
        if _has_any(rounds, (key,)):
            heights = [row.get(key) or 0.0 for row in rounds]
            axes.bar(numbers, heights, bottom=bottom, label=key.removeprefix("timing/"))
            bottom = [b + h for b, h in zip(bottom, heights)]
    # The rest of the round (driver bookkeeping, data movement), so the bar's height is the round's wall time.
    if _has_any(rounds, ("timing/round",)):
        other = [max((row.get("timing/round") or 0.0) - b, 0.0) for row, b in zip(rounds, bottom)]
        axes.bar(numbers, other, bottom=bottom, label="other", color="lightgrey")
    # outside the axes: a legend inside would hide the top of the bars
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
    figure.savefig(path)


# The builtin oracle's terms (apo_ray.builtin.oracle.GOLD_TERMS), as the evaluation logs them.
GOLD_TERM_PREFIX = "eval/gold_"


def gold_term_keys(rounds: Rounds) -> list[str]:
    """The eval/gold_<term> means a run logged, in the order first logged (not the score or errors)."""
    keys = dict.fromkeys(
        key
        for row in rounds
        for key in row
        if key.startswith(GOLD_TERM_PREFIX) and key != "eval/gold_score" and not key.endswith("_se")
    )
    return list(keys)


def _plot_gold_terms(rounds: Rounds, path: Path) -> None:
    figure, axes = _new_axes("Gold score by term (mean contribution +- SE)", "raw gold points")
    for key in gold_term_keys(rounds):
        xs, ys = _series(rounds, key)
        errors = [row.get(f"{key}_se") or 0.0 for row in rounds if row.get(key) is not None]
        axes.errorbar(xs, ys, yerr=errors, marker="o", capsize=3, label=key.removeprefix(GOLD_TERM_PREFIX))
    axes.axhline(0.0, color="grey", linewidth=1)
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
    figure.savefig(path)


def _gold_terms_section(rounds: Rounds) -> list[str]:
    """Each gold term at the first and the last evaluation and its change: what the policy gained (a term
    rising) and where it lost gold while the RM score rose (a penalty growing)."""
    keys = gold_term_keys(rounds)
    if not keys:
        return []
    evaluated = [row for row in rounds if any(row.get(key) is not None for key in keys)]
    first, last = evaluated[0], evaluated[-1]
    rows = []
    for key in keys:
        rise = score_rise(first, last, key)
        change = f"{rise['change']:+.3f} +- {rise['change_se']:.3f}" if rise else ""
        rows.append([key.removeprefix(GOLD_TERM_PREFIX), _with_se(first, key), _with_se(last, key), change])
    return [
        "## Gold score by term",
        "",
        "The gold score is 3 tanh(raw / 3), raw the sum of these terms (apo_ray.builtin.oracle.gold_terms). A "
        "positive change is gold the policy won; a negative one is gold it lost, where a rising RM score "
        "with a falling term is the RM being hacked.",
        "",
        *_markdown_table(("term", f"round {first['round']}", f"round {last['round']}", "change"), rows),
        "",
    ]


@dataclass(frozen=True)
class _Plot:
    title: str
    file_name: str
    keys: tuple[str, ...]
    draw: Callable[[Rounds, Path], None]


def _plot(title: str, file_name: str, draw: Callable[[Rounds, Path], None]) -> _Plot:
    """A plot drawn when a run records any of the keys the metric catalog shows on it."""
    return _Plot(title, file_name, shown_in(f"plot:{file_name}"), draw)


PLOTS = (
    _plot(
        "RM accuracy",
        "rm_accuracy.png",
        partial(
            _line_plot,
            lines={"human pairs": "rm/acc", "policy pairs": "rm/acc_policy"},
            title="RM preference accuracy",
            ylabel="accuracy",
            chance_level=0.5,
        ),
    ),
    _plot(
        "RM calibration (ECE)",
        "rm_ece.png",
        partial(
            _line_plot,
            lines={"human pairs": "rm/ece", "policy pairs": "rm/ece_policy"},
            title="RM expected calibration error",
            ylabel="ECE (lower is better)",
        ),
    ),
    _plot("Gold vs. RM score", "scores.png", _plot_scores),
    # Online runs measure KL on every iteration's own rollouts (policy/kl) and on held-out prompts (eval/kl).
    _plot(
        "KL to reference",
        "kl.png",
        partial(
            _line_plot,
            lines={"policy samples": "policy/kl", "held-out prompts": "eval/kl"},
            title="KL(policy || reference)",
            ylabel="KL (nats)",
        ),
    ),
    _plot(
        "AAPA: discriminator score of policy samples",
        "aapa_disc_score.png",
        partial(
            _error_bar_plot,
            lines={"D(x, y) of the round's samples": "aapa/disc_score"},
            title="AAPA discriminator score (+-1 SE)",
            ylabel="mean D(x, y) (1: expert-like)",
        ),
    ),
    _plot(
        "APL: attacks and harm",
        "apl_harm.png",
        partial(
            _error_bar_plot,
            lines={
                "trained attacker": "apl/attack_success_rate",
                "fixed attacker": "apl/attack_success_rate_fixed",
                "clean prompts": "apl/harmful_rate",
            },
            title="APL: harmful answers of the defender (+-1 SE)",
            ylabel="fraction of samples harmful (gold oracle)",
        ),
    ),
    _plot(
        "APL: utility",
        "apl_utility.png",
        partial(
            _error_bar_plot,
            lines={"gold score, clean prompts": "apl/utility"},
            title="APL: defender's utility (+-1 SE)",
            ylabel="gold score",
        ),
    ),
    _Plot("Timings", "timings.png", TIMING_KEYS, _plot_timings),
)


def _plots_for(rounds: Rounds) -> list[_Plot]:
    plots = [plot for plot in PLOTS if _has_any(rounds, plot.keys)]
    terms = tuple(gold_term_keys(rounds))
    if terms:
        plots.append(_Plot("Gold score by term", "gold_terms.png", terms, _plot_gold_terms))
    return plots


def _format(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    return str(value)


def _with_se(row: dict[str, Any], key: str) -> str:
    """`row[key]`, with `+- <key>_se` beside it where the row has the error."""
    value, error = row.get(key), row.get(f"{key}_se")
    if value is None or error is None or error != error:  # no error, or NaN (one value)
        return _format(value)
    return f"{_format(value)} +- {_format(error)}"


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(_format(value) for value in row) + " |" for row in rows]
    return lines


def _flatten(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in mapping.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}/"))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _load_summary(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / SUMMARY_FILE
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}:{error.lineno}: not valid JSON ({error.msg})") from error
    if not isinstance(summary, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return _flatten(summary)


def write_report(run_dir: Path) -> Path:
    """Writes run_dir/report/{*.png, report.md}; returns the path of report.md."""
    run_dir = Path(run_dir)
    rounds = load_rounds(run_dir)
    out_dir = run_dir / REPORT_DIR
    out_dir.mkdir(exist_ok=True)
    plots = _plots_for(rounds)
    for plot in plots:
        plot.draw(rounds, out_dir / plot.file_name)

    lines = [f"# apo-ray run report: {run_dir.name}", "", f"Run directory: `{run_dir}`", ""]
    summary = _load_summary(run_dir)
    if summary:
        lines += ["## Summary", "", *_markdown_table(("key", "value"), list(summary.items())), ""]
    evaluated = [row for row in rounds if row.get("eval/gold_score") is not None]
    rise = score_rise(evaluated[0], evaluated[-1]) if evaluated else None
    if rise is not None:
        lines += ["**Gold score:** " + rise_line("eval/gold_score", rise), ""]
    columns = [key for key in (*TABLE_KEYS, *GAME_TABLE_KEYS) if _has_any(rounds, (key,))]
    lines += [
        "## Per round",
        "",
        *_markdown_table(
            ("round", *columns), [[row["round"], *(_with_se(row, key) for key in columns)] for row in rounds]
        ),
        "",
    ]
    lines += _gold_terms_section(rounds)
    lines += ["## Plots", ""]
    for plot in plots:
        lines += [f"### {plot.title}", "", f"![{plot.title}]({plot.file_name})", ""]
    # Phases and the iterations' own KL depend on the method (online only, some of them): only missing
    # measurements are news.
    missing = [key for key in TABLE_KEYS if key not in columns and key not in (*TIMING_KEYS, "policy/kl")]
    if missing:
        lines += ["Not recorded in this run: " + ", ".join(f"`{key}`" for key in missing) + ".", ""]
    report = out_dir / "report.md"
    report.write_text("\n".join(lines), encoding="utf-8")
    return report


# What `apo-ray compare` puts side by side: (metric, panel title); the gold score and the RM's accuracy on
# policy pairs carry their standard errors.
COMPARED = (
    ("eval/gold_score", "Gold score of policy samples"),
    ("eval/rm_score", "RM score of policy samples"),
    ("rm/acc_policy", "RM accuracy on policy pairs"),
    ("eval/kl", "KL(policy || reference)"),
)


def compare_runs(run_dirs: Sequence[Path], out_dir: Path, labels: Sequence[str] | None = None) -> Path:
    """Several runs side by side (e.g. APO next to its fixed-RM baseline): one plot, out_dir/comparison.png
    (gold score, RM score, RM accuracy on policy pairs and KL per round, with error bars where logged), and one
    table, out_dir/comparison.md (each at the run's first and last evaluation, and the gold score's change
    with its error). Returns the table's path."""
    run_dirs = [Path(run_dir) for run_dir in run_dirs]
    labels = list(labels) if labels is not None else [run_dir.name for run_dir in run_dirs]
    if len(labels) != len(run_dirs):
        raise ValueError(f"compare_runs got {len(run_dirs)} run directories but {len(labels)} labels")
    runs = [load_rounds(run_dir) for run_dir in run_dirs]
    figure = Figure(figsize=(11.0, 8.0), dpi=110, layout="constrained")
    for axes, (key, title) in zip(figure.subplots(2, 2).flat, COMPARED):
        axes.set_title(title)
        axes.set_ylabel(key)
        if key == "rm/acc_policy":
            axes.axhline(0.5, color="grey", linestyle=":", linewidth=1)
        for index, (rounds, label) in enumerate(zip(runs, labels)):
            points = [row for row in rounds if row.get(key) is not None]
            if points:
                axes.errorbar(
                    [row["round"] for row in points],
                    [row[key] for row in points],
                    yerr=[row.get(f"{key}_se") or 0.0 for row in points],
                    fmt="o-",
                    capsize=3,
                    color=f"C{index}",
                    label=label,
                )
        _style_round_axis(axes)
        if axes.get_legend_handles_labels()[0]:
            axes.legend()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_dir / "comparison.png")

    header = ["run", "rounds", *(f"{key} {when}" for key, _ in COMPARED for when in ("start", "end")), "gold change"]
    rows = []
    for rounds, label in zip(runs, labels):
        evaluated = [row for row in rounds if row.get("eval/gold_score") is not None] or rounds
        first, last = evaluated[0], evaluated[-1]
        rise = score_rise(first, last)
        rows.append(
            [
                label,
                f"{first['round']}-{last['round']}",
                *(_with_se(row, key) for key, _ in COMPARED for row in (first, last)),
                rise_line("eval/gold_score", rise).split(": ", 1)[1] if rise else "",
            ]
        )
    table = out_dir / "comparison.md"
    table.write_text(
        "\n".join(["# apo-ray compare", "", *_markdown_table(header, rows), "", "![comparison](comparison.png)", ""]),
        encoding="utf-8",
    )
    return table
