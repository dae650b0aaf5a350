"""Processes for the benchmark: start them pinned, watch their memory and CPU, stop them all.

Everything the benchmark starts runs in its own process group, so stopping it also stops
whatever it spawned, and nothing is left behind on Ctrl-C or an error.
"""

import contextlib
import os
import resource
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def raise_nofile_limit() -> int:
    """Raise the soft open-file limit to the hard one; children inherit it."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def free_port() -> int:
    # The port may in theory be taken again before the server binds it; on loopback in a
    # benchmark that race is rare enough to accept.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class Cores:
    """Which cores the proxy under test gets, and which the load, upstream and harness get."""

    proxy: tuple[int, ...]
    load: tuple[int, ...]

    @property
    def pinned(self) -> bool:
        return bool(self.proxy) and bool(self.load)

    @staticmethod
    def detect() -> "Cores":
        usable = sorted(os.sched_getaffinity(0))
        if len(usable) < 2:
            return Cores(proxy=(), load=())
        return Cores(proxy=(usable[0],), load=tuple(usable[1:]))

    def pin(self, command: list[str], role: str) -> list[str]:
        """Prefix a command with taskset; threads the process starts later inherit the mask."""
        cores = self.proxy if role == "proxy" else self.load
        if not cores:
            return command
        return ["taskset", "-c", ",".join(map(str, cores)), *command]

    def describe(self) -> str:
        if not self.pinned:
            return "not pinned (fewer than 2 usable cores): figures are less stable"
        return (
            f"proxy under test on core {_cores_text(self.proxy)}, "
            f"load generator and upstream on core {_cores_text(self.load)}"
        )


def _cores_text(cores: tuple[int, ...]) -> str:
    return ",".join(map(str, cores))


class Processes:
    """Owns every process the benchmark starts; stop_all() ends them, group by group."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.running: list[subprocess.Popen] = []

    def start(self, name: str, command: list[str]) -> subprocess.Popen:
        # Output goes to a file, never a pipe: a chatty server must not block on a full pipe.
        with open(self.log_dir / f"{name}.log", "ab") as log:
            process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.running.append(process)
        return process

    def run(self, command: list[str], timeout: float) -> str:
        """Run a command to its end and return its stdout; kill its group if it overruns."""
        process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            text=True,
        )
        self.running.append(process)
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{command[0]} still running after {timeout:.0f} s") from None
        finally:
            self.stop(process)
        if process.returncode != 0:
            raise RuntimeError(f"{command[0]} exited with {process.returncode}: {err.strip()}")
        return out

    def run_until(self, command: list[str], marker: str, timeout: float) -> str:
        """Run a command; when it prints a line starting with marker, send it SIGINT.

        wrk sleeps for its whole -d even after its threads stop, and prints its results
        early only on SIGINT; this lets a fixed request count end the run at once.
        """
        process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            text=True,
        )
        self.running.append(process)
        watchdog = threading.Timer(timeout, _signal_group, (process.pid, signal.SIGKILL))
        watchdog.start()
        lines = []
        try:
            for line in process.stdout:
                lines.append(line)
                if line.startswith(marker):
                    process.send_signal(signal.SIGINT)
            process.wait()
        finally:
            watchdog.cancel()
            self.stop(process)
        return "".join(lines)

    def stop(self, process: subprocess.Popen, grace: float = 5.0) -> None:
        if process in self.running:
            self.running.remove(process)
        if process.poll() is None:
            _signal_group(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        # Helpers the process left behind in its group go too. While any is alive the group
        # id cannot be handed to another process, so this reaches only what we started.
        if group_pids(process.pid):
            _signal_group(process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=grace)

    def stop_all(self) -> None:
        for process in reversed(list(self.running)):
            self.stop(process)

    @contextlib.contextmanager
    def scope(self):
        """On leaving, stop every process started inside: each section frees the cores it used."""
        before = list(self.running)
        try:
            yield self
        finally:
            for process in reversed([p for p in self.running if p not in before]):
                self.stop(process)

    def log_tail(self, name: str, lines: int = 15) -> str:
        path = self.log_dir / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def group_pids(pgid: int) -> list[int]:
    """Every live process in a process group: a wrapper's children count towards its memory."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            # The command name in field 2 may hold spaces, so split after its closing paren.
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid:
                pids.append(int(entry.name))
    return pids


def _status_kb(pid: int, field: str) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def rss_mb(pgid: int) -> float:
    return sum(_status_kb(pid, "VmRSS") for pid in group_pids(pgid)) / 1024


def peak_rss_mb(pgid: int) -> float:
    """VmHWM: the most resident memory each process ever had, so no spike is missed."""
    return sum(_status_kb(pid, "VmHWM") for pid in group_pids(pgid)) / 1024


def _cpu_of(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime + stime
    return total / CLOCK_TICKS


class CpuAccount:
    """How much CPU time went to processes the benchmark did not start, and to the hypervisor.

    Other work on a shared machine (a test suite, a build) skews every figure; this puts a
    number on it. Interrupt time is left out on both sides, as the kernel charges no
    process for it.
    """

    def __init__(self) -> None:
        self.start = self._read()

    @staticmethod
    def _read() -> tuple[float, float, float, float]:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        user, nice, system, steal = fields[0], fields[1], fields[2], fields[7]
        own = resource.getrusage(resource.RUSAGE_SELF)
        # Every process the benchmark started has been waited for by the time we read this.
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        own_s = own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime
        return (user + nice + system) / CLOCK_TICKS, steal / CLOCK_TICKS, sum(fields), own_s

    def summary(self) -> dict:
        busy, steal, ticks, own = (b - a for a, b in zip(self.start, self._read(), strict=True))
        capacity = ticks / CLOCK_TICKS  # all cores' seconds, busy or not
        if capacity <= 0:
            return {"others_pct": None, "steal_pct": None}
        return {
            "others_pct": round(100 * max(0.0, busy - own) / capacity, 1),
            "steal_pct": round(100 * steal / capacity, 1),
        }


def thread_affinity(pgid: int) -> dict:
    """The cores every thread of the group may run on, to prove helper threads are pinned too."""
    masks: set[str] = set()
    threads = 0
    for pid in group_pids(pgid):
        for task in Path(f"/proc/{pid}/task").glob("*"):
            with contextlib.suppress(OSError):
                for line in (task / "status").read_text().splitlines():
                    if line.startswith("Cpus_allowed_list:"):
                        masks.add(line.split()[1])
                        threads += 1
    return {"threads": threads, "cores": sorted(masks)}


class Sampler:
    """Every 100 ms, note the resident memory and CPU time of some process groups.

    Runs as a thread of the harness, which sits on the load core(s): group members are
    looked up once a second, not on every sample, to keep that core for the load.
    """

    def __init__(self, groups: dict[str, int], interval: float = 0.1) -> None:
        self.groups = groups
        self.interval = interval
        self.samples: list[tuple[float, dict[str, tuple[float, float]]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="sampler", daemon=True)

    def __enter__(self) -> "Sampler":
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        members: dict[str, list[int]] = {}
        refreshed = 0.0
        while not self._stop.is_set():
            now = time.time()
            if now - refreshed > 1.0:
                members = {name: group_pids(pgid) for name, pgid in self.groups.items()}
                refreshed = now
            point = {
                name: (sum(_status_kb(p, "VmRSS") for p in pids) / 1024, _cpu_of(pids))
                for name, pids in members.items()
            }
            self.samples.append((now, point))
            self._stop.wait(self.interval)

    def peak_rss_mb(self, name: str) -> float:
        return max((point[name][0] for _, point in self.samples), default=0.0)

    def cpu_share(self, name: str, start: float, end: float) -> float | None:
        """CPU seconds the group used per second between two time.time() values."""
        inside = [(at, point[name][1]) for at, point in self.samples if start <= at <= end]
        if len(inside) < 2 or inside[-1][0] <= inside[0][0]:
            return None
        return (inside[-1][1] - inside[0][1]) / (inside[-1][0] - inside[0][0])


def wait_for_port(port: int, process: subprocess.Popen, timeout: float = 15.0) -> None:
    """Wait until something accepts connections on a loopback port, or the process dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"exited with {process.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on port {port} after {timeout:.0f} s")
