"""Benchmark apipool-proxy side by side with its upstream and a minimal aiohttp proxy.

Three sections, each with fresh processes:
  nonstream  wrk against the upstream stand-in (nginx), the reference proxy and apipool-proxy
  stream     concurrent SSE streams; per-chunk delay, errors and the proxy's peak memory
  leak       apipool-proxy's resident memory as the served request count grows

Prints markdown tables and one PASS/FAIL line per target, and writes everything to
bench-results/<UTC time>.json. Exits 0 even when a target fails, unless --strict.

    python scripts/bench.py [--quick] [--only stream] [--runs 3] [--duration 5]
"""

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import bench_apipool
import bench_report
import bench_targets
import bench_wrk
from bench_apipool import Apipool, ApipoolUnavailable, local_request
from bench_procs import (
    Cores,
    CpuAccount,
    Processes,
    Sampler,
    free_port,
    peak_rss_mb,
    raise_nofile_limit,
    rss_mb,
    thread_affinity,
    wait_for_port,
)

SCRIPTS = Path(__file__).resolve().parent
SECTIONS = ("nonstream", "stream", "leak")
CHUNKS, CHUNK_INTERVAL = 100, 0.02
WARM_UP_S = 2.0
LEAK_CONNECTIONS = 32


@dataclass
class Settings:
    """What one run measures; --quick shrinks every load to a smoke test."""

    runs: int
    duration: float
    connections: tuple[int, ...] = (1, 32, 256)
    streams: int = 1000
    light_streams: int = 100
    leak_checkpoints: tuple[int, ...] = (10_000, 50_000, 100_000, 150_000, 200_000)
    # Caps the leak check so the whole default run ends within about ten minutes even when
    # apipool-proxy is slow; falling short of the last checkpoint is reported, not hidden.
    leak_budget_s: float = 210.0
    proxy_cmd: str = bench_apipool.DEFAULT_COMMAND

    @staticmethod
    def from_args(args: argparse.Namespace) -> "Settings":
        settings = Settings(runs=args.runs, duration=args.duration, proxy_cmd=args.proxy_cmd)
        if args.quick:
            settings.runs, settings.duration = 1, 2.0
            settings.streams, settings.light_streams = 200, 50
            settings.leak_checkpoints = (2_000, 10_000, 20_000)
            settings.leak_budget_s = 60.0
        if args.streams:
            settings.streams = args.streams
        return settings


@dataclass
class Context:
    settings: Settings
    procs: Processes
    cores: Cores
    tools: dict[str, str]
    workdir: Path
    notes: list[str] = field(default_factory=list)


def progress(message: str) -> None:
    # Progress goes to stderr so stdout holds only the report, ready to paste.
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--runs", type=int, default=3, help="measured runs per figure, median taken (default 3)"
    )
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run (5)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: 1 run of 2 s, 200 streams, 20,000 requests for the leak check",
    )
    parser.add_argument(
        "--only", action="append", choices=SECTIONS, help="run only this section (repeatable)"
    )
    parser.add_argument(
        "--proxy-cmd",
        default=bench_apipool.DEFAULT_COMMAND,
        help="how to start apipool-proxy; {python} and {config} are filled in "
        "(default: %(default)s). It must serve in the foreground.",
    )
    parser.add_argument("--streams", type=int, help="concurrent streams (default 1000)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir with all logs")
    parser.add_argument("--strict", action="store_true", help="exit 1 when any target fails")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.duration <= 0 or (args.streams is not None and args.streams < 1):
        parser.error("--runs, --duration and --streams must be positive")
    return args


# --- shared steps ------------------------------------------------------------------------


def start_reference(ctx: Context, upstream_url: str, stream: bool):
    port = free_port()
    command = [sys.executable, str(SCRIPTS / "reference_proxy.py"), "--port", str(port)]
    command += ["--upstream", upstream_url] + (["--stream"] if stream else [])
    name = "reference-stream" if stream else "reference"
    process = ctx.procs.start(name, ctx.cores.pin(command, "proxy"))
    wait_for_port(port, process)
    return port, process


def try_apipool(ctx: Context, section: str, upstream_base: str) -> tuple[Apipool | None, str]:
    """Start apipool-proxy and prove one completion goes through; on failure say why."""
    progress(f"{section}: starting apipool-proxy")
    try:
        apipool = bench_apipool.start(
            ctx.procs,
            ctx.cores,
            ctx.workdir / f"apipool-{section}",
            f"apipool-{section}",
            upstream_base,
            ctx.settings.proxy_cmd,
        )
        check_completion(apipool.proxy_port, apipool.token, "apipool-proxy")
    except (ApipoolUnavailable, RuntimeError, OSError) as exc:
        progress(f"{section}: apipool-proxy unavailable, measuring the others only:\n{exc}")
        return None, str(exc)
    return apipool, ""


def check_completion(port: int, token: str, who: str) -> None:
    """One request before the load: a target answering errors fast must not look fast."""
    status, answer = local_request(
        port, "POST", "/v1/chat/completions", bench_wrk.REQUEST_BODY, token=token
    )
    if status != 200 or not isinstance(answer, dict) or "choices" not in answer:
        raise ApipoolUnavailable(f"{who}: chat completion answered {status}: {str(answer)[:300]}")


def require_wrk(ctx: Context) -> None:
    if "wrk" not in ctx.tools or "nginx" not in ctx.tools:
        raise RuntimeError("wrk and nginx are needed (see the install hint above)")


# --- nonstream ---------------------------------------------------------------------------


def nonstream_section(ctx: Context) -> dict:
    require_wrk(ctx)
    nginx_port = bench_wrk.start_nginx(
        ctx.procs, ctx.cores, ctx.tools["nginx"], ctx.workdir / "nginx"
    )
    upstream_url = f"http://127.0.0.1:{nginx_port}/v1/chat/completions"
    reference_port, _ = start_reference(ctx, upstream_url, stream=False)
    targets = {"direct": (nginx_port, ""), "reference": (reference_port, "")}
    check_completion(nginx_port, "", "nginx")
    check_completion(reference_port, "", "reference proxy")

    apipool, error = try_apipool(ctx, "nonstream", f"http://127.0.0.1:{nginx_port}/v1")
    if apipool:
        targets["apipool"] = (apipool.proxy_port, apipool.token)

    scripts = {
        name: bench_wrk.lua_script(ctx.workdir, f"post-{name}", token)
        for name, (_, token) in targets.items()
    }
    levels = [
        {"connections": c, "targets": measure_level(ctx, targets, scripts, c)}
        for c in ctx.settings.connections
    ]
    section = {"runs": ctx.settings.runs, "duration": ctx.settings.duration, "levels": levels}
    section["apipool_error"] = error
    if apipool:
        section["apipool_threads"] = thread_affinity(apipool.pgid)
    return section


def measure_level(ctx: Context, targets: dict, scripts: dict, connections: int) -> dict:
    """Warm every target up, then alternate between them run by run, so drift hits all alike."""
    s = ctx.settings

    def once(name: str, seconds: float) -> bench_wrk.WrkResult:
        url = f"http://127.0.0.1:{targets[name][0]}/v1/chat/completions"
        return bench_wrk.run_wrk(
            ctx.procs, ctx.cores, ctx.tools["wrk"], url, scripts[name], connections, seconds
        )

    progress(f"nonstream: {connections} connections, warm-up")
    for name in targets:
        once(name, min(WARM_UP_S, s.duration))
    runs: dict[str, list] = {name: [] for name in targets}
    for index in range(s.runs):
        progress(f"nonstream: {connections} connections, run {index + 1}/{s.runs}")
        for name in targets:
            runs[name].append(once(name, s.duration))
    return {name: bench_wrk.median_of(results) for name, results in runs.items()}


# --- stream ------------------------------------------------------------------------------


def build_stream_load(ctx: Context) -> str:
    """Compile scripts/stream_load.c, the streaming load tool, into the work directory."""
    if "cc" not in ctx.tools:
        raise RuntimeError("a C compiler is needed for the streaming load (see the hint above)")
    binary = ctx.workdir / "stream_load"
    command = [ctx.tools["cc"], "-O2", "-std=gnu11", "-Wall", "-Wextra", "-o", str(binary)]
    command += [str(SCRIPTS / "stream_load.c"), "-lm"]
    ctx.procs.run(command, timeout=120)
    return str(binary)


def stream_section(ctx: Context) -> dict:
    ctx.tools["stream_load"] = build_stream_load(ctx)
    upstream_port = free_port()
    command = [ctx.tools["stream_load"], "serve", "--port", str(upstream_port)]
    command += ["--chunks", str(CHUNKS), "--interval", str(CHUNK_INTERVAL)]
    upstream = ctx.procs.start("stream-upstream", ctx.cores.pin(command, "load"))
    wait_for_port(upstream_port, upstream)

    upstream_url = f"http://127.0.0.1:{upstream_port}/v1/chat/completions"
    paths = {"direct": (upstream_port, "", None)}
    if "nginx" in ctx.tools:
        floor_port, floor = bench_wrk.start_nginx_stream_proxy(
            ctx.procs, ctx.cores, ctx.tools["nginx"], ctx.workdir / "nginx-floor", upstream_port
        )
        paths["floor"] = (floor_port, "", floor.pid)
    reference_port, reference = start_reference(ctx, upstream_url, stream=True)
    paths["reference"] = (reference_port, "", reference.pid)
    apipool, error = try_apipool(ctx, "stream", f"http://127.0.0.1:{upstream_port}/v1")
    if apipool:
        paths["apipool"] = (apipool.proxy_port, apipool.token, apipool.pgid)

    # The light load comes first: it warms every path up and shows the delay each adds
    # while no process is short of CPU. The full load is the target; one stall (a garbage
    # collection, say) can swing a single run, so it runs --runs times, paths alternating.
    light, full = ctx.settings.light_streams, ctx.settings.streams
    loads = [stream_load(ctx, paths, light, 1, upstream.pid)]
    loads.append(stream_load(ctx, paths, full, ctx.settings.runs, upstream.pid))

    section = {"streams": full, "chunks": CHUNKS, "runs": ctx.settings.runs, "loads": loads}
    section["interval_ms"] = CHUNK_INTERVAL * 1000
    section["apipool_error"] = error
    if apipool:
        section["apipool_threads"] = thread_affinity(apipool.pgid)
    return section


def stream_load(ctx: Context, paths: dict, streams: int, runs: int, upstream_pgid: int) -> dict:
    results: dict[str, list] = {name: [] for name in paths}
    for index in range(runs):
        for name, (port, token, pgid) in paths.items():
            progress(f"stream: {streams:,} streams through {name}, run {index + 1}/{runs}")
            results[name].append(run_streams(ctx, port, token, streams, pgid, upstream_pgid))
    combined = {name: combine_stream_runs(each) for name, each in results.items()}
    return {"streams": streams, "runs": runs, "paths": combined}


def combine_stream_runs(runs: list[dict]) -> dict:
    """Median of each figure over the runs; errors add up; memory takes the worst run."""

    def median(figure, within=None):
        values = [(run[within] if within else run).get(figure) for run in runs]
        values = [value for value in values if value is not None]
        return statistics.median(values) if values else None

    errors = sum((Counter(run["error_kinds"]) for run in runs), Counter())
    combined = {
        "streams": runs[0]["streams"],
        "completed": min(run["completed"] for run in runs),
        "errors": sum(run["errors"] for run in runs),
        "error_kinds": dict(errors),
        "error_samples": {k: v for run in runs for k, v in run["error_samples"].items()},
        "opened_late": sum(run["opened_late"] for run in runs),
        "offered_chunks_per_s": runs[0]["offered_chunks_per_s"],
        "delay_ms": {p: median(p, "delay_ms") for p in ("p50", "p90", "p99", "max")},
    }
    for figure in ("achieved_chunks_per_s", "client_cpu_share", "upstream_cpu_share"):
        combined[figure] = median(figure)
    if "proxy_cpu_share" in runs[0]:
        combined["proxy_cpu_share"] = median("proxy_cpu_share")
        combined["peak_rss_mb"] = max(run["peak_rss_mb"] for run in runs)
    combined["runs"] = runs
    return combined


def run_streams(ctx: Context, port: int, token: str, streams: int, proxy_pgid, upstream_pgid):
    """Run the stream client once; add the proxy's memory and every process's CPU share."""
    command = [ctx.tools["stream_load"], "run"]
    command += ["--url", f"http://127.0.0.1:{port}/v1/chat/completions", "--streams", str(streams)]
    command += ["--chunks", str(CHUNKS), "--interval", str(CHUNK_INTERVAL)]
    # A 2 s stream not finished a minute after its start is broken, not slow.
    command += ["--timeout", "60"] + (["--token", token] if token else [])

    groups = {"upstream": upstream_pgid} | ({"proxy": proxy_pgid} if proxy_pgid else {})
    with Sampler(groups) as sampler:
        output = ctx.procs.run(ctx.cores.pin(command, "load"), timeout=180)
    result = json.loads(output)

    # CPU shares cover the sending phase only, as the client's own share does.
    span = (result["sending_from"], result["sending_until"])
    result["upstream_cpu_share"] = sampler.cpu_share("upstream", *span)
    if proxy_pgid:
        result["proxy_cpu_share"] = sampler.cpu_share("proxy", *span)
        result["peak_rss_mb"] = peak_rss_mb(proxy_pgid)  # VmHWM: catches spikes between samples
        result["sampled_peak_rss_mb"] = sampler.peak_rss_mb("proxy")
    return result


# --- leak --------------------------------------------------------------------------------


def leak_section(ctx: Context) -> dict:
    require_wrk(ctx)
    nginx_port = bench_wrk.start_nginx(
        ctx.procs, ctx.cores, ctx.tools["nginx"], ctx.workdir / "nginx"
    )
    apipool, error = try_apipool(ctx, "leak", f"http://127.0.0.1:{nginx_port}/v1")
    target = ctx.settings.leak_checkpoints[-1]
    section = {"target_requests": target, "apipool_error": error, "checkpoints": []}
    if not apipool:
        return section

    url = f"http://127.0.0.1:{apipool.proxy_port}/v1/chat/completions"
    deadline = time.monotonic() + ctx.settings.leak_budget_s
    served = errors = 0
    for checkpoint in ctx.settings.leak_checkpoints:
        remaining = deadline - time.monotonic()
        if remaining < 1:
            ctx.notes.append(f"leak check stopped at its {ctx.settings.leak_budget_s:.0f} s budget")
            break
        progress(f"leak: serving requests {served:,} -> {checkpoint:,}")
        script = bench_wrk.lua_script(
            ctx.workdir, f"leak-{checkpoint}", apipool.token, checkpoint - served
        )
        result = bench_wrk.run_wrk_count(
            ctx.procs, ctx.cores, ctx.tools["wrk"], url, script, LEAK_CONNECTIONS, remaining
        )
        served, errors = served + result.requests, errors + result.errors
        time.sleep(0.5)  # let closed connections release their buffers before reading RSS
        rss = rss_mb(apipool.pgid)
        section["checkpoints"].append({"requests": served, "rss_mb": rss, "errors": errors})

    points = section["checkpoints"]
    if len(points) >= 2:
        section["growth_pct"] = (points[-1]["rss_mb"] / points[0]["rss_mb"] - 1) * 100
    else:
        section["error"] = "too few requests served to compare memory"
    return section


# --- report ------------------------------------------------------------------------------

STREAM_NOTE = """\
How to read the streaming table: every stream is opened first, then all of them send at once,
their chunks spread evenly over each {interval_ms:g} ms interval. The stream client and the
upstream stand-in (scripts/stream_load.c) share the load core(s). "direct" is the client
straight at the upstream: the delay the measuring setup adds by itself, which the "minus
direct" columns subtract (a difference of percentiles, so approximate). "nginx pass-through"
is nginx relaying the streams unbuffered on the proxy core: the cost of relaying at all on
this machine, below which no proxy can go. CPU is the share of one core used while chunks
flowed. When "chunks/s" falls short of the offered rate, or a CPU share nears 1.00, some
process could not keep pace, and the delays measure queueing in it: if "direct" itself falls
short, the load side is the limit and the delay target cannot be judged on this machine."""


def report(results: dict) -> list[str]:
    lines = ["## apipool-proxy benchmark", "", bench_report.machine_line(results["machine"])]
    lines += [f"pinning: {results['pinning']}"]
    lines += bench_report.elsewhere_lines(results["cpu_elsewhere"])
    sections = results["sections"]
    threads = next(
        (s["apipool_threads"] for s in sections.values() if "apipool_threads" in s), None
    )
    if threads:
        # Helper threads (SQLite, resolvers) inherit the mask; this proves they did.
        lines.append(
            f"apipool-proxy ran {threads['threads']} threads, allowed on core(s) "
            f"{' / '.join(threads['cores'])}"
        )
    lines.append("")
    if "nonstream" in sections and "levels" in sections["nonstream"]:
        lines += bench_report.nonstream_table(sections["nonstream"]) + [""]
    if "stream" in sections and "loads" in sections["stream"]:
        stream = sections["stream"]
        lines += bench_report.stream_table(stream) + [""]
        lines += [STREAM_NOTE.format(interval_ms=stream["interval_ms"]), ""]
    if sections.get("leak", {}).get("checkpoints"):
        lines += bench_report.leak_table(sections["leak"]) + [""]
    for name, section in sections.items():
        if section.get("apipool_error"):
            reason = section["apipool_error"].splitlines()[0]
            lines.append(f"apipool-proxy not measured in {name}: {reason} (details in the JSON)")
    lines += results["notes"]
    return lines


# --- main --------------------------------------------------------------------------------


def run_sections(ctx: Context, names: list[str]) -> dict:
    sections = {}
    runners = {"nonstream": nonstream_section, "stream": stream_section, "leak": leak_section}
    for name in names:
        started = time.monotonic()
        try:
            with ctx.procs.scope():
                sections[name] = runners[name](ctx)
        except (RuntimeError, OSError, ValueError, ApipoolUnavailable) as exc:
            progress(f"{name}: failed: {exc}")
            sections[name] = {"error": str(exc)}
        sections[name]["seconds"] = round(time.monotonic() - started, 1)
    return sections


def prepare(args: argparse.Namespace) -> Context:
    cores = Cores.detect()
    if cores.pinned:
        # The harness samples memory and parses output: keep that off the proxy's core too.
        os.sched_setaffinity(0, cores.load)
    limit = raise_nofile_limit()
    if limit < 4096:
        progress(f"open-file limit is {limit}: thousands of streams may fail to connect")

    names = args.only or list(SECTIONS)
    wanted = ["wrk", "nginx"] if {"nonstream", "leak"} & set(names) else []
    wanted += ["cc", "nginx"] if "stream" in names else []
    wanted = list(dict.fromkeys(wanted))
    tools = bench_wrk.ensure_tools(wanted)
    workdir = Path(tempfile.mkdtemp(prefix="apipool-bench-"))
    return Context(Settings.from_args(args), Processes(workdir), cores, tools, workdir)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Turn SIGTERM into an exception so the finally below stops everything we started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    ctx = prepare(args)
    started, account = time.monotonic(), CpuAccount()
    try:
        sections = run_sections(ctx, args.only or list(SECTIONS))
    except KeyboardInterrupt:
        progress("interrupted")
        return 130
    finally:
        ctx.procs.stop_all()
        if args.keep:
            progress(f"kept logs and configs in {ctx.workdir}")
        else:
            shutil.rmtree(ctx.workdir, ignore_errors=True)

    results = {
        "machine": bench_report.machine_info(ctx.tools),
        "cpu_elsewhere": account.summary(),
        "pinning": ctx.cores.describe(),
        "settings": vars(ctx.settings),
        "sections": sections,
        "notes": ctx.notes,
        "seconds": round(time.monotonic() - started, 1),
    }
    verdicts = bench_targets.all_verdicts(results)
    results["verdicts"] = [line for _, line in verdicts]
    lines = report(results) + [""] + results["verdicts"]
    path = bench_report.write_json(results)
    lines += ["", f"results: {path.relative_to(bench_report.REPO)} ({results['seconds']:.0f} s)"]
    bench_report.print_lines(lines)
    return 1 if args.strict and not all(passed for passed, _ in verdicts) else 0


if __name__ == "__main__":
    sys.exit(main())
