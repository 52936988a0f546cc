"""The operator under test as a process tree: its CPU seconds and memory from /proc, its log lines.

Any command line works (`BENCH_OPERATOR`), so nothing here asks the operator itself: CPU is utime+stime of
the process and its descendants, memory their VmRSS, and the peak their VmHWM (reset between scenarios
through /proc/PID/clear_refs, so each scenario reports its own peak).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")
# A log line at warning level or worse: JSON lines by their level; others as structlog's console, logfmt, klog
# (W1127 12:00:00...) or plain WARNING/ERROR words write it.
LEVEL_KEYS = ("level", "severity", "levelname")
BAD_LEVELS = frozenset({"warn", "warning", "error", "critical", "fatal", "panic"})
WARNING_TEXT = re.compile(r"(?i:\[\s*(warn|warning|error|critical)\s*\]|\blevel=\"?(warn|warning|error))|"
                          r"\b(WARN|WARNING|ERROR|FATAL|CRITICAL|Traceback)\b|^[WEF]\d{4} ")


def is_warning(line: str) -> bool:
    if line.startswith("{"):
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict):
            return any(str(record.get(k, "")).lower() in BAD_LEVELS for k in LEVEL_KEYS)
    return bool(WARNING_TEXT.search(line))


WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            found += [int(p) for p in task.read_text().split()]
        except OSError:
            continue
    return found


def tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        todo += _children(p)
    return pids


def _status_kib(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_seconds(pid: int) -> float:
    total = 0
    for p in tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / TICKS


@dataclass
class OperatorProcess:
    command: list[str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    log_offset: int = field(default=0)
    cwd: Path | None = None  # where the command runs (the repository, for `python -m e2e.bench.limit`)

    metrics_url: str = ""

    @classmethod
    def from_template(cls, template: str, log_path: Path, **values: str) -> OperatorProcess:
        port = str(free_port())
        proc = cls([part.format(metrics_port=port, **values) for part in shlex.split(template)], log_path)
        if "{metrics_port}" in template:
            proc.metrics_url = f"http://127.0.0.1:{port}/metrics"
        return proc

    def refused_writes(self) -> int | None:
        """Writes the API server refused (4xx), by the operator's own rest_client_requests_total (client-go's and
        controller-runtime's name, and this operator's); None when it has no such metrics."""
        if not self.metrics_url:
            return None
        try:
            with urllib.request.urlopen(self.metrics_url, timeout=5) as response:
                text = response.read().decode()
        except OSError:
            return None
        total = 0.0
        for line in text.splitlines():
            if line.startswith("rest_client_requests_total{"):
                code = re.search(r'code="(\d+)"', line)
                method = re.search(r'method="([A-Z]+)"', line)
                if code and method and code.group(1).startswith("4") and method.group(1) in WRITE_METHODS:
                    total += float(line.rsplit(" ", 1)[1])
        return int(total)

    def start(self) -> float:
        log = self.log_path.open("ab")
        self.started_at = time.monotonic()
        # (a kubeconfig's certificates and key, which kubernetes_asyncio writes to temporary files, stay in the
        # scratch folder when the process is killed)
        self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                     cwd=self.cwd, env={**os.environ, "TMPDIR": str(self.log_path.parent)})
        log.close()
        return self.started_at

    @property
    def pid(self) -> int:
        assert self.proc is not None, "the operator is not running"
        if self.proc.poll() is not None:
            raise RuntimeError(f"the operator exited with {self.proc.returncode}; see {self.log_path}")
        return self.proc.pid

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def rss_mib(self) -> float:
        return sum(_status_kib(p, "VmRSS") for p in tree(self.pid)) / 1024

    def peak_mib(self) -> float:
        return sum(_status_kib(p, "VmHWM") for p in tree(self.pid)) / 1024

    def reset_peak(self) -> None:
        for p in tree(self.pid):
            with contextlib.suppress(OSError):
                Path(f"/proc/{p}/clear_refs").write_text("5")

    def log_text(self) -> str:
        """What it logged since mark_log()."""
        if not self.log_path.exists():
            return ""
        with self.log_path.open("rb") as f:
            f.seek(self.log_offset)
            return f.read().decode(errors="replace")

    async def wait_log(self, text: str, timeout: float) -> None:
        """Until a line it logged since mark_log() contains `text`; an error if it exits first."""
        deadline = time.monotonic() + timeout
        while text not in self.log_text():
            _ = self.pid  # raises if it exited
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.command[:3]} did not log {text!r} in {timeout:.0f} s; see {self.log_path}")
            await asyncio.sleep(0.1)

    def mark_log(self) -> None:
        self.log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0

    def warning_lines(self) -> list[str]:
        """Lines logged since mark_log() that say warning or error."""
        return [line for line in self.log_text().splitlines() if is_warning(line)]

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None

    async def wait_quiet(self, quiet_for: float = 2.0, timeout: float = 120.0, cpu_share: float = 0.02) -> float:
        """Wait until the process tree used under `cpu_share` of a core for `quiet_for` seconds; return when
        its work ended (the start of that quiet stretch)."""
        deadline = time.monotonic() + timeout
        last_cpu, last_busy = self.cpu(), time.monotonic()
        while time.monotonic() < deadline:
            await asyncio.sleep(0.25)
            now, cpu = time.monotonic(), self.cpu()
            if cpu - last_cpu > cpu_share * 0.25 + 1 / TICKS:
                last_busy = now
            last_cpu = cpu
            if now - last_busy >= quiet_for:
                return last_busy
        return time.monotonic()
