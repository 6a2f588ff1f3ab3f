"""Helpers for tests that start Ray nodes on 127.0.0.1 themselves (`ray start` processes)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

RAY = os.path.join(os.path.dirname(sys.executable), "ray")


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def node_ports() -> list[str]:
    manager, objects, agent, agent_grpc, metrics, runtime_env = free_ports(6)
    return ["--node-manager-port", str(manager), "--object-manager-port", str(objects),
            "--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port", str(agent_grpc),
            "--metrics-export-port", str(metrics), "--runtime-env-agent-port", str(runtime_env)]


def wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)  # polling a starting process, not timing anything
    raise TimeoutError(f"{what} not ready after {timeout_s:.0f} s")


def stop(process: subprocess.Popen) -> None:
    """Ends a `ray start --block` process (never `ray stop`, which would end every Ray on the machine)."""
    process.terminate()
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
