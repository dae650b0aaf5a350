"""Non-streaming load: nginx as the upstream stand-in and wrk as the load generator.

nginx answers every chat completion with one canned body from memory, so it is never the
bottleneck; wrk reports through a Lua done() hook as JSON, not through its human output.
"""

import json
import os
import shutil
import statistics
import subprocess
from dataclasses import dataclass
from pathlib import Path

from bench_procs import Cores, Processes, free_port, wait_for_port

REQUEST_BODY = {
    "model": "gpt-4o-mini",
    "messages": [
        {"role": "system", "content": "You are a concise assistant."},
        {"role": "user", "content": "Say hello to the benchmark in one short sentence."},
    ],
    "max_tokens": 32,
}
CANNED_COMPLETION = {
    "id": "chatcmpl-bench",
    "object": "chat.completion",
    "created": 1700000000,
    "model": "gpt-4o-mini",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hello, benchmark!"},
            "finish_reason": "stop",
        }
    ],
    "usage": {"prompt_tokens": 28, "completion_tokens": 5, "total_tokens": 33},
}
WRK_MARK = "BENCH_JSON "
REACHED_MARK = "BENCH_REACHED"
# Latency and duration arrive in microseconds; %d keeps the JSON free of Lua float formats.
DONE_HOOK = """
function done(summary, latency, requests)
  local e = summary.errors
  local fields = {
    requests = summary.requests, duration_us = summary.duration,
    connect = e.connect, read = e.read, write = e.write, status = e.status, timeout = e.timeout,
    p50_us = latency:percentile(50), p99_us = latency:percentile(99), max_us = latency.max,
  }
  local parts = {}
  for name, value in pairs(fields) do
    parts[#parts + 1] = string.format('"%s":%d', name, value)
  end
  io.write("BENCH_JSON {" .. table.concat(parts, ",") .. "}\\n")
end
"""


def find_tool(name: str) -> str | None:
    # nginx lives in /usr/sbin, which is not on every user's PATH.
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


# Debian packages for the tools each section needs. "cc" builds the streaming load tool.
PACKAGES = {"wrk": ["wrk"], "nginx": ["nginx"], "cc": ["gcc", "libc6-dev"]}


def ensure_tools(names: list[str]) -> dict[str, str]:
    """Find the named tools; as root with apt, install what is missing. Returns what was found."""
    missing = [name for name in names if not find_tool(name)]
    if missing and os.geteuid() == 0 and shutil.which("apt-get"):
        packages = [package for name in missing for package in PACKAGES[name]]
        print(f"installing {' '.join(packages)} with apt-get ...", flush=True)
        apt_install(packages)
        if "nginx" in missing:
            print("note: Debian's nginx package may enable a system nginx service on port 80")
    found = {name: find_tool(name) for name in names}
    still = [package for name, path in found.items() if not path for package in PACKAGES[name]]
    if still:
        print(f"missing tools: install with `sudo apt-get install -y {' '.join(still)}`")
    return {name: path for name, path in found.items() if path}


def apt_install(packages: list[str]) -> None:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    command = ["apt-get", "install", "-y", "-q", *packages]
    if subprocess.run(command, env=env, capture_output=True, check=False).returncode == 0:
        return
    # A fresh machine often has no package lists yet.
    subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, check=False)
    subprocess.run(command, env=env, capture_output=True, check=False)


def start_nginx(procs: Processes, cores: Cores, nginx: str, workdir: Path) -> int:
    """Start nginx in the foreground with one worker, answering a canned completion."""
    port, _ = run_nginx(procs, cores, nginx, workdir, "load", canned_location())
    return port


def start_nginx_stream_proxy(
    procs: Processes, cores: Cores, nginx: str, workdir: Path, upstream_port: int
) -> tuple[int, subprocess.Popen]:
    """Start nginx as an unbuffered pass-through proxy on the proxy core: (port, process).

    A C proxy that does nothing but relay: what any proxy must pay on this machine's
    loopback, the floor below which no Python proxy can go.
    """
    upstream = [f"  upstream stream_up {{ server 127.0.0.1:{upstream_port}; keepalive 2048; }}"]
    location = [
        "    location / {",
        "      proxy_pass http://stream_up;",
        "      proxy_http_version 1.1;",
        '      proxy_set_header Connection "";',
        "      proxy_buffering off;",
        "      proxy_request_buffering off;",
        "    }",
    ]
    return run_nginx(procs, cores, nginx, workdir, "proxy", location, upstream)


def run_nginx(
    procs: Processes,
    cores: Cores,
    nginx: str,
    workdir: Path,
    role: str,
    location: list[str],
    http_extra: list[str] | None = None,
) -> tuple[int, subprocess.Popen]:
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = workdir / "nginx.conf"
    config.write_text(nginx_config(workdir, port, location, http_extra or []))
    command = [nginx, "-p", str(workdir), "-e", str(workdir / "error.log"), "-c", str(config)]
    process = procs.start(f"nginx-{workdir.name}", cores.pin(command, role))
    wait_for_port(port, process)
    return port, process


def canned_location() -> list[str]:
    body = json.dumps(CANNED_COMPLETION, separators=(",", ":"))
    # `return` answers any method; a static file would refuse POST with 405.
    return [
        "    location /v1/chat/completions {",
        "      default_type application/json;",
        f"      return 200 '{body}';",
        "    }",
    ]


def nginx_config(workdir: Path, port: int, location: list[str], http_extra: list[str]) -> str:
    temp = [f"{kind}_temp_path {workdir / kind};" for kind in ("client_body", "proxy")]
    temp += [f"{kind}_temp_path {workdir / kind};" for kind in ("fastcgi", "uwsgi", "scgi")]
    return "\n".join(
        [
            "daemon off;",
            "worker_processes 1;",
            "worker_rlimit_nofile 65536;",
            f"pid {workdir / 'nginx.pid'};",
            "events { worker_connections 8192; }",
            "http {",
            "  access_log off;",
            "  keepalive_requests 10000000;",
            "  keepalive_timeout 120s;",
            *(f"  {line}" for line in temp),
            *http_extra,
            f"  server {{ listen 127.0.0.1:{port} backlog=4096;",
            *location,
            "  }",
            "}",
            "",
        ]
    )


def lua_script(workdir: Path, name: str, token: str = "", stop_after: int = 0) -> Path:
    """A wrk script that POSTs the chat request and prints its results as one JSON line."""
    lines = [
        'wrk.method = "POST"',
        f"wrk.body = [==[{json.dumps(REQUEST_BODY)}]==]",
        'wrk.headers["Content-Type"] = "application/json"',
    ]
    if token:
        lines.append(f'wrk.headers["Authorization"] = {json.dumps("Bearer " + token)}')
    if stop_after:
        # Counting in response() makes wrk parse every response; fine for the leak check,
        # which measures memory, not speed.
        lines += [
            "local seen = 0",
            "function response()",
            "  seen = seen + 1",
            f"  if seen == {stop_after} then",
            f'    io.write("{REACHED_MARK}\\n")',
            "    io.flush()",
            "    wrk.thread:stop()",
            "  end",
            "end",
        ]
    lines.append(DONE_HOOK)
    path = workdir / f"{name}.lua"
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass
class WrkResult:
    requests: int
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int


def run_wrk(
    procs: Processes,
    cores: Cores,
    wrk: str,
    url: str,
    script: Path,
    connections: int,
    seconds: float,
) -> WrkResult:
    # One thread: wrk has one core (shared with nginx) and one thread saturates it.
    command = [
        wrk,
        "-t1",
        f"-c{connections}",
        f"-d{seconds:g}s",
        "--timeout",
        "10s",
        "-s",
        str(script),
        url,
    ]
    output = procs.run(cores.pin(command, "load"), timeout=seconds + 30)
    return parse_wrk(output)


def run_wrk_count(
    procs: Processes,
    cores: Cores,
    wrk: str,
    url: str,
    script: Path,
    connections: int,
    cap_seconds: float,
) -> WrkResult:
    """Run until the script's request count is reached, or cap_seconds at most."""
    command = [
        wrk,
        "-t1",
        f"-c{connections}",
        f"-d{cap_seconds:.0f}s",
        "--timeout",
        "10s",
        "-s",
        str(script),
        url,
    ]
    output = procs.run_until(cores.pin(command, "load"), REACHED_MARK, timeout=cap_seconds + 30)
    return parse_wrk(output)


def parse_wrk(output: str) -> WrkResult:
    line = next((ln for ln in output.splitlines() if ln.startswith(WRK_MARK)), None)
    if line is None:
        raise RuntimeError(f"wrk printed no results:\n{output}")
    raw = json.loads(line[len(WRK_MARK) :])
    errors = sum(raw[kind] for kind in ("connect", "read", "write", "status", "timeout"))
    return WrkResult(
        requests=raw["requests"],
        rps=raw["requests"] / (raw["duration_us"] / 1e6),
        p50_ms=raw["p50_us"] / 1000,
        p99_ms=raw["p99_us"] / 1000,
        errors=errors,
    )


def median_of(runs: list[WrkResult]) -> dict:
    """Median of each figure on its own, plus the raw runs for the record."""
    return {
        "rps": statistics.median(r.rps for r in runs),
        "p50_ms": statistics.median(r.p50_ms for r in runs),
        "p99_ms": statistics.median(r.p99_ms for r in runs),
        "errors": sum(r.errors for r in runs),
        "runs": [vars(r) for r in runs],
    }
