"""Turn benchmark results into markdown tables and a JSON record."""

import json
import os
import platform
import subprocess
import sys
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
NAMES = {
    "direct": "direct (upstream)",
    "floor": "nginx pass-through (C floor)",
    "reference": "reference proxy",
    "apipool": "apipool-proxy",
}


def machine_info(tools: dict[str, str]) -> dict:
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "aiohttp": package_version("aiohttp"),
        "uvloop": package_version("uvloop"),
        "apipool_proxy": package_version("apipool-proxy"),
        "kernel": platform.release(),
        "wrk": tool_version([tools["wrk"], "-v"]) if "wrk" in tools else None,
        "nginx": tool_version([tools["nginx"], "-v"]) if "nginx" in tools else None,
        "commit": tool_version(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]),
    }


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def tool_version(command: list[str]) -> str | None:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return None
    # wrk prints its version on stdout, nginx on stderr.
    text = (done.stdout + done.stderr).strip().splitlines()
    return text[0].strip() if done.returncode in (0, 1) and text else None


def machine_line(machine: dict) -> str:
    return (
        f"machine: {machine['cpu']}, {machine['cores']} cores, Python {machine['python']}, "
        f"aiohttp {machine['aiohttp']}, uvloop {machine['uvloop']}, kernel {machine['kernel']}"
    )


def elsewhere_lines(elsewhere: dict) -> list[str]:
    others, steal = elsewhere["others_pct"], elsewhere["steal_pct"]
    line = (
        f"CPU time taken by other processes during the run: {fmt(others, 1)} %, "
        f"by the hypervisor (steal): {fmt(steal, 1)} %"
    )
    if (others or 0) + (steal or 0) > 5:
        # The load and the proxy were meant to have the cores to themselves.
        return [line, "**warning: the machine was busy with other work; figures are disturbed**"]
    return [line]


def fmt(value, digits: int = 2, suffix: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return f"{value:,}{suffix}"
    return f"{value:,.{digits}f}{suffix}"


def ratio(numerator, denominator) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def table_row(cells: list) -> str:
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def nonstream_table(section: dict) -> list[str]:
    lines = [
        f"### Non-streaming: POST /v1/chat/completions, median of {section['runs']} runs "
        f"x {section['duration']:g} s after a warm-up",
        "",
        "| target | connections | req/s | p50 ms | p99 ms | errors |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for level in section["levels"]:
        figures, connections = level["targets"], level["connections"]
        for name, row in figures.items():
            cells = [NAMES[name], connections, fmt(row["rps"], 0)]
            cells += [fmt(row["p50_ms"], 3), fmt(row["p99_ms"], 3), row["errors"]]
            lines.append(table_row(cells))
        if "apipool" in figures:
            apipool, reference = figures["apipool"], figures["reference"]
            shares = [
                fmt(ratio(apipool[figure], reference[figure]), suffix="x")
                for figure in ("rps", "p50_ms", "p99_ms")
            ]
            lines.append(table_row(["*apipool / reference*", connections, *shares, ""]))
    return lines


def stream_table(section: dict) -> list[str]:
    lines = [
        f"### Streaming: {section['chunks']} chunks per stream, "
        f"{section['interval_ms']:g} ms apart; delay = caller receive time - upstream send time",
        "",
        f"Full load: median of {section['runs']} runs; ok is the worst run's, errors add up.",
        "",
        "| path | streams | ok | errors | delay p50 ms | delay p99 ms | p50 minus direct "
        "| p99 minus direct | chunks/s sent of offered | proxy CPU | load core CPU "
        "| peak RSS MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for load in section["loads"]:
        base = load["paths"]["direct"]["delay_ms"]
        for name, row in load["paths"].items():
            lines.append(table_row(stream_cells(NAMES[name], row, base)))
    return lines


def stream_cells(name: str, row: dict, base: dict) -> list:
    delay = row["delay_ms"]
    # Client and upstream share the load core(s): their sum near 1.00 means it is saturated.
    load_cpu = None
    if row["client_cpu_share"] is not None and row["upstream_cpu_share"] is not None:
        load_cpu = row["client_cpu_share"] + row["upstream_cpu_share"]
    rate = f"{fmt(row['achieved_chunks_per_s'])} of {row['offered_chunks_per_s']:,}"
    return [
        name,
        f"{row['streams']:,}",
        f"{row['completed']:,}",
        row["errors"],
        fmt(delay["p50"]),
        fmt(delay["p99"]),
        fmt(minus(delay["p50"], base["p50"])),
        fmt(minus(delay["p99"], base["p99"])),
        rate,
        fmt(row.get("proxy_cpu_share")),
        fmt(load_cpu),
        fmt(row.get("peak_rss_mb"), 1),
    ]


def minus(value, base):
    return None if value is None or base is None else value - base


def leak_table(section: dict) -> list[str]:
    lines = ["### Memory of apipool-proxy under sustained load (32 connections)", ""]
    lines += ["| requests served | RSS MB | errors so far |", "|---:|---:|---:|"]
    for point in section["checkpoints"]:
        lines.append(
            table_row([f"{point['requests']:,}", fmt(point["rss_mb"], 1), point["errors"]])
        )
    points = section["checkpoints"]
    lines += ["", f"growth from first to last checkpoint: {fmt(section.get('growth_pct'), 1)} %"]
    if len(points) >= 3:
        # Warm-up (caches, allocator arenas) grows early; a leak keeps growing to the end.
        middle, last = points[len(points) // 2], points[-1]
        growth = (last["rss_mb"] / middle["rss_mb"] - 1) * 100
        lines.append(
            f"growth over the later part ({middle['requests']:,} -> {last['requests']:,}"
            f" requests): {growth:.1f} %"
        )
    return lines


def write_json(results: dict) -> Path:
    directory = REPO / "bench-results"
    directory.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = directory / f"{stamp}.json"
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    return path


def print_lines(lines: list[str]) -> None:
    sys.stdout.write("\n".join(lines) + "\n")
    sys.stdout.flush()
