"""Starts N featsim processes on 127.0.0.1 (jax.distributed over gloo) for the tests.

Each process's output goes to a file (a pipe could fill and block it); every process is
killed at the deadline, so a test never hangs on a stuck run.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclasses.dataclass
class Finished:
    returncode: int
    output: str
    seconds: float


def run_processes(commands: list[list[str]], folder: Path, *, timeout: float = 240,
                  env: dict | None = None) -> list[Finished]:
    """Runs the commands at once (one per process) and waits for all, at most ``timeout`` s."""
    folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", **(env or {})}
    start = time.monotonic()
    logs, procs = [], []
    for i, command in enumerate(commands):
        log = open(folder / f"process{i}.log", "w")
        logs.append(log)
        procs.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                      cwd=folder))
    ends = [None] * len(procs)
    try:
        while any(e is None for e in ends):
            for i, p in enumerate(procs):
                if ends[i] is None and p.poll() is not None:
                    ends[i] = time.monotonic() - start
            if time.monotonic() - start > timeout:
                raise TimeoutError(f"processes still running after {timeout:.0f} s")
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()
    return [Finished(p.returncode, (folder / f"process{i}.log").read_text(), ends[i])
            for i, p in enumerate(procs)]


def distributed_flags(count: int, port: int, index: int) -> list[str]:
    return ["--distributed", "--coordinator", f"127.0.0.1:{port}", "--num-processes",
            str(count), "--process-id", str(index)]


def featsim_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "featsim.cli", *args]
