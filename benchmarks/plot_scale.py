"""The performance page's plots, drawn from the JSON that ``bench_scale.py --json`` writes.

- ``scale-throughput.png``: hits per second and p99 time to the last byte against the number
  of concurrent connections, one panel per backend: the proxy (1 and 2 workers) and the
  ceiling (uvicorn serving the same bytes, measured in the same rounds).
- ``scale-events.png``: cost per event (time to the last byte / events) against the stream's
  length, log axes: hit, miss, direct (no proxy) and ceiling.
- ``scale-memory.png``: the proxy's peak RSS per live miss and per follower against how many
  there are, and against the answer's length.

Every point is the median over the rounds, its bar the range [min-max]. ``--tables 100``
prints the page's tables (Markdown; (a) at 100 connections) instead.

Run: ``.venv/bin/python benchmarks/plot_scale.py [docs/img/scale.json] [--out docs/img]``.
matplotlib is pinned in requirements/dev.lock but not installed by the dev extra:
``.venv/bin/python -m pip install -c requirements/dev.lock matplotlib``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
INSTALL = ".venv/bin/python -m pip install -c requirements/dev.lock matplotlib"
BACKENDS = ("memory", "sqlite", "redis")
TITLES = {"memory": "memory://", "sqlite": "SQLite", "redis": "Redis (same machine)"}
EVENT_PATHS = (
    ("hit", "hit (proxy)", "tab:blue", "o"),
    ("ceiling", "ceiling (uvicorn, same bytes)", "0.4", "s"),
    ("miss", "miss (proxy)", "tab:red", "^"),
    ("direct", "direct (no proxy)", "tab:orange", "v"),
)


def median_range(values: Sequence[float]) -> tuple[float, float, float]:
    """(median, median - min, max - median): a point and its error bar."""
    med = statistics.median(values)
    return med, med - min(values), max(values) - med


def errorbar(ax: Any, xs: list[float], samples: list[list[float]], **style: Any) -> None:
    points = [median_range(s) for s in samples]
    ax.errorbar(
        xs,
        [p[0] for p in points],
        yerr=[[p[1] for p in points], [p[2] for p in points]],
        capsize=3,
        **style,
    )


def machine_note(report: dict[str, Any]) -> str:
    m = report["machine"]
    loads = [m["load_average"][0], *m.get("load_average_end", [])[:1]]
    load = " → ".join(f"{v:.1f}" for v in loads)
    return f"{m['cpus']} CPUs, CPython {m['python']}, load average (1 min) {load}"


def plot_throughput(plt: Any, report: dict[str, Any], out: Path) -> Path:
    hits = report["hits"]
    backends = [b for b in BACKENDS if any(h["backend"] == b for h in hits)]
    fig, axes = plt.subplots(2, len(backends), figsize=(4.6 * len(backends), 7.5), squeeze=False)
    for col, backend in enumerate(backends):
        rate_ax, p99_ax = axes[0][col], axes[1][col]
        mine = [h for h in hits if h["backend"] == backend]
        for workers in sorted({h["workers"] for h in mine}):
            configs = sorted((h for h in mine if h["workers"] == workers), key=_connections)
            xs = [c["connections"] for c in configs]
            label = f"proxy, {workers} worker{'s' if workers > 1 else ''}"
            style = {"color": "tab:blue", "marker": "o", "linestyle": "-" if workers == 1 else "--"}
            for ax, figure, unit in ((rate_ax, "rate", 1.0), (p99_ax, "p99", 1e3)):
                samples = [[r["proxy"][figure] * unit for r in c["rounds"]] for c in configs]
                errorbar(ax, xs, samples, label=label, **style)
        # The ceiling: every load it served at that concurrency, next to either proxy.
        xs = sorted({h["connections"] for h in mine})
        for ax, figure, unit in ((rate_ax, "rate", 1.0), (p99_ax, "p99", 1e3)):
            samples = [
                [
                    r["ceiling"][figure] * unit
                    for h in mine
                    if h["connections"] == x
                    for r in h["rounds"]
                ]
                for x in xs
            ]
            errorbar(ax, xs, samples, label="ceiling", color="0.4", marker="s")
        rate_ax.set_title(TITLES[backend])
        rate_ax.set_ylabel("hits per second" if col == 0 else "")
        p99_ax.set_ylabel("p99 time to the last byte (ms)" if col == 0 else "")
        p99_ax.set_xlabel("concurrent connections")
        for ax in (rate_ax, p99_ax):
            ax.set_xscale("log")
            ax.set_xticks(xs, [str(x) for x in xs])
            ax.minorticks_off()
            ax.set_ylim(bottom=0)
            ax.grid(True, alpha=0.3)
        rate_ax.legend(fontsize="small")
    stream = Path(report["args"]["stream"]).name
    fig.suptitle(
        f"Hits of the recorded {stream} through sse-cache proxy vs the ceiling\n"
        f"median and range over {report['args']['rounds']} rounds; {machine_note(report)}",
        fontsize="medium",
    )
    fig.tight_layout()
    return save(fig, out / "scale-throughput.png")


def _connections(config: dict[str, Any]) -> int:
    return int(config["connections"])


def plot_events(plt: Any, report: dict[str, Any], out: Path) -> Path:
    rows = sorted(report["events"], key=lambda row: row["events"])
    fig, ax = plt.subplots(figsize=(7, 5))
    xs = [row["events"] for row in rows]
    for path, label, color, marker in EVENT_PATHS:
        samples = [[t / row["events"] * 1e6 for t in row[path]] for row in rows]
        errorbar(ax, xs, samples, label=label, color=color, marker=marker)
    ax.set_xscale("log")
    ax.set_yscale("log")
    plain(ax, xs)
    ax.set_xlabel("events in the stream")
    ax.set_ylabel("time to the last byte per event (µs)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    ax.set_title(
        f"Cost per event as streams grow (Responses answers from sse-cache mock-upstream)\n"
        f"median and range over {report['args']['rounds']} rounds; {machine_note(report)}",
        fontsize="medium",
    )
    fig.tight_layout()
    return save(fig, out / "scale-events.png")


def plot_memory(plt: Any, report: dict[str, Any], out: Path) -> Path:
    cases = report["memory"]
    base = min(c["deltas"] for c in cases)
    fig, (by_count, by_length) = plt.subplots(1, 2, figsize=(11, 4.6))
    styles = {
        "misses": ("per live miss", "tab:red", "^"),
        "followers": ("per follower (of one live miss)", "tab:blue", "o"),
    }
    count = max((c["count"] for c in cases if c["deltas"] != base), default=None)
    for kind, (label, color, marker) in styles.items():
        sweep = sorted((c for c in cases if c["kind"] == kind and c["deltas"] == base), key=_count)
        lengths = sorted(
            (c for c in cases if c["kind"] == kind and c["count"] == count), key=_bytes
        )
        for figure, line, what in (("per_stream", "-", "peak"), ("live_per_stream", ":", "live")):
            if sweep:
                errorbar(
                    by_count,
                    [c["count"] for c in sweep],
                    [[v / 1e3 for v in c[figure]] for c in sweep],
                    label=f"{label}, {what} ({sweep[0]['bytes'] / 1e3:.0f} KB answers)",
                    color=color,
                    marker=marker,
                    linestyle=line,
                )
            if len(lengths) > 1:
                errorbar(
                    by_length,
                    [round(c["bytes"] / 1e3) for c in lengths],
                    [[v / 1e3 for v in c[figure]] for c in lengths],
                    label=f"{label}, {what} ({count} at once)",
                    color=color,
                    marker=marker,
                    linestyle=line,
                )
    by_count.set_xlabel("live misses at once, or followers of one live miss")
    by_length.set_xlabel("answer size (KB)")
    counts = [c["count"] for c in cases if c["deltas"] == base]
    # (a follower's answer and a miss's differ by a few bytes: one tick for both)
    first = cases[0]["kind"]
    sizes = [round(c["bytes"] / 1e3) for c in cases if c["count"] == count and c["kind"] == first]
    for ax, xs in ((by_count, counts), (by_length, sizes)):
        ax.set_ylabel("RSS rise / count (KB)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        plain(ax, xs)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="x-small")
    fig.suptitle(
        "sse-cache proxy memory per live stream and per follower (SQLite backend)\n"
        f"median and range over {report['args']['rounds']} rounds; {machine_note(report)}",
        fontsize="medium",
    )
    fig.tight_layout()
    return save(fig, out / "scale-memory.png")


def _count(case: dict[str, Any]) -> int:
    return int(case["count"])


def _bytes(case: dict[str, Any]) -> int:
    return int(case["bytes"])


def plain(ax: Any, xs: Sequence[float]) -> None:
    """Log axes labelled 1, 2, 5, 10 rather than 10^0, 10^1; the x ticks at ``xs``."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.set_xticks(sorted(set(xs)))
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.10g}"))
        axis.set_minor_formatter(NullFormatter())


def save(fig: Any, path: Path) -> Path:
    # No software version or date in the file: the same figures give the same PNG.
    fig.savefig(path, dpi=110, metadata={"Software": None})
    return path


# -- the page's tables ------------------------------------------------------------------------

X, DASH = "\u00d7", "\u2013"  # the page's multiplication sign and en dash


def med(values: Sequence[float], unit: float = 1.0, digits: int = 0) -> str:
    return f"{statistics.median(values) * unit:,.{digits}f}"


def ranged(values: Sequence[float], unit: float = 1.0, digits: int = 0) -> str:
    """``median [min-max]`` (an en dash, as on the page)."""
    lo, hi = min(values) * unit, max(values) * unit
    return f"{med(values, unit, digits)} [{lo:,.{digits}f}{DASH}{hi:,.{digits}f}]"


def hits_table(report: dict[str, Any], connections: int) -> str:
    lines = [
        "| backend | proxy req/s | ceiling req/s | throughput ratio | proxy p99 | ceiling p99 "
        "| p99 ratio | proxy CPU / hit | ceiling CPU / answer | CPU ratio |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for config in report["hits"]:
        if config["connections"] != connections:
            continue
        rounds = config["rounds"]

        def of(path: str, figure: str) -> list[float]:
            return [r[path][figure] for r in rounds]  # noqa: B023 (used at once)

        def ratio(figure: str) -> list[float]:
            return [p / c for p, c in zip(of("proxy", figure), of("ceiling", figure), strict=True)]

        name = TITLES[config["backend"]].split(" ")[0].replace("memory://", "memory")
        if config["workers"] > 1:
            name += f", `--workers {config['workers']}`"
        cpu = med(of("proxy", "server_cpu_per_request"), 1e6) + " µs"
        backend_cpu = [v for v in of("proxy", "backend_cpu_per_request") if v == v]
        if backend_cpu:
            cpu += f" (+{med(backend_cpu, 1e6)} µs redis-server)"
        lines.append(
            f"| {name} | {ranged(of('proxy', 'rate'))} | {ranged(of('ceiling', 'rate'))} "
            f"| {ranged(ratio('rate'), digits=2)}{X} | {med(of('proxy', 'p99'), 1e3)} ms "
            f"| {med(of('ceiling', 'p99'), 1e3)} ms | {ranged(ratio('p99'), digits=2)}{X} | {cpu} "
            f"| {med(of('ceiling', 'server_cpu_per_request'), 1e6)} µs "
            f"| {med(ratio('server_cpu_per_request'), digits=2)}{X} |"
        )
    return "\n".join(lines)


def sweep_table(report: dict[str, Any]) -> str:
    counts = sorted({c["connections"] for c in report["hits"]})
    lines = [
        "| proxy | " + " | ".join(f"{n} connections" for n in counts) + " |",
        "|---|" + "---:|" * len(counts),
    ]
    names = list(dict.fromkeys((c["backend"], c["workers"]) for c in report["hits"]))
    for backend, workers in names:
        cells = []
        for n in counts:
            (config,) = [
                c
                for c in report["hits"]
                if (c["backend"], c["workers"], c["connections"]) == (backend, workers, n)
            ]
            rates = [r["proxy"]["rate"] / r["ceiling"]["rate"] for r in config["rounds"]]
            p99s = [r["proxy"]["p99"] / r["ceiling"]["p99"] for r in config["rounds"]]
            cells.append(f"{med(rates, digits=2)}{X} / {med(p99s, digits=2)}{X}")
        name = f"{backend}, {workers} worker{'s' if workers > 1 else ''}"
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def events_table(report: dict[str, Any]) -> str:
    lines = [
        "| events | bytes | miss | direct | miss per event | direct per event | hit | ceiling "
        "| hit per event | ceiling per event |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in sorted(report["events"], key=lambda row: row["events"]):
        n = row["events"]

        def per(path: str) -> str:
            value = statistics.median(row[path]) / n * 1e6  # noqa: B023 (used at once)
            return f"{value:,.{2 if value < 10 else 0}f} µs"

        def total(path: str) -> str:
            value = statistics.median(row[path]) * 1e3  # noqa: B023 (used at once)
            return f"{value:,.{1 if value < 100 else 0}f} ms"

        lines.append(
            f"| {n:,} | {row['bytes'] / 1e6:.2f} MB | {total('miss')} | {total('direct')} "
            f"| {per('miss')} | {per('direct')} | {total('hit')} | {total('ceiling')} "
            f"| {per('hit')} | {per('ceiling')} |"
        )
    return "\n".join(lines)


def memory_table(report: dict[str, Any]) -> str:
    lines = [
        f"| what | answer | peak RSS rise | per stream (peak) | {X} the answer "
        "| per stream (live) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for case in report["memory"]:
        rises = [r["peak"] - r["baseline"] for r in case["rounds"]]
        what = (
            f"{case['count']:,} live miss{'es' if case['count'] > 1 else ''}"
            if case["kind"] == "misses"
            else f"1 live miss + {case['count']:,} follower{'s' if case['count'] > 1 else ''}"
        )
        times = [v / case["bytes"] for v in case["per_stream"]]
        live = [v for v in case["live_per_stream"] if v == v]
        lines.append(
            f"| {what} | {case['events']:,} events, {case['bytes'] / 1e3:,.0f} KB "
            f"| {ranged(rises, 1e-6, 1)} MB | {ranged(case['per_stream'], 1e-3)} KB "
            f"| {med(times, digits=1)}{X} | {ranged(live, 1e-3) if live else 'n/a'} KB |"
        )
    return "\n".join(lines)


def tables(report: dict[str, Any], connections: int) -> str:
    parts = []
    if report.get("hits"):
        parts += [f"(a) at {connections} connections", hits_table(report, connections)]
        parts += ["(a) throughput ratio / p99 ratio per concurrency", sweep_table(report)]
    if report.get("events"):
        parts += ["(b)", events_table(report)]
    if report.get("memory"):
        parts += ["(c)", memory_table(report)]
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "report",
        type=Path,
        nargs="?",
        default=ROOT / "docs" / "img" / "scale.json",
        help="what bench_scale.py --json wrote (default docs/img/scale.json)",
    )
    parser.add_argument("--out", type=Path, default=None, help="default: the report's folder")
    parser.add_argument(
        "--tables",
        type=int,
        metavar="CONNECTIONS",
        default=None,
        help="print the page's tables in Markdown ((a) at this concurrency) instead of drawing",
    )
    args = parser.parse_args(argv)
    if args.tables is not None:
        try:
            print(tables(json.loads(args.report.read_text()), args.tables))
        except (OSError, ValueError) as exc:
            print(f"cannot read {args.report}: {exc}", file=sys.stderr)
            return 2
        return 0
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed; install it with:\n  {INSTALL}", file=sys.stderr)
        return 2
    try:
        report = json.loads(args.report.read_text())
    except (OSError, ValueError) as exc:
        print(f"cannot read {args.report}: {exc}", file=sys.stderr)
        return 2
    out = args.out or args.report.parent
    out.mkdir(parents=True, exist_ok=True)
    plots = {"hits": plot_throughput, "events": plot_events, "memory": plot_memory}
    missing = [mode for mode in plots if not report.get(mode)]
    if len(missing) == len(plots):
        print(f"{args.report} holds no figures (hits, events or memory)", file=sys.stderr)
        return 2
    for mode, plot in plots.items():
        if mode in missing:
            print(f"no {mode} figures in {args.report}: its plot is not drawn")
            continue
        print(f"written: {plot(plt, report, out)}")
        plt.close("all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
