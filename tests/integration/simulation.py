"""Running the README's simulation wrapper from tests: private FLWR_HOME, free loopback ports."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WRAPPER = ROOT / "scripts" / "run_simulation.sh"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def simulation_env(home: Path, supernodes: int = 2) -> dict[str, str]:
    """The wrapper's environment: its own FLWR_HOME and SuperLink ports, ``supernodes`` nodes."""
    return {
        **os.environ,
        "FLWR_HOME": str(home),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
        "NUM_SUPERNODES": str(supernodes),
    }


def run_simulation(
    tmp_path: Path, overrides: str, *, supernodes: int = 2, timeout: float = 420
) -> tuple[int, str]:
    """``bash scripts/run_simulation.sh -c overrides`` to completion: (exit code, its output)."""
    completed = subprocess.run(
        ["bash", str(WRAPPER), "-c", overrides],
        cwd=ROOT,
        env=simulation_env(tmp_path / "flwr-home", supernodes),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return completed.returncode, completed.stdout + completed.stderr


def audit_verify(run_dir: Path) -> subprocess.CompletedProcess[str]:
    """``robustmerge-fl audit verify run_dir``, run from this checkout, as CI runs it."""
    return subprocess.run(
        [sys.executable, "-m", "strategies.cli", "audit", "verify", str(run_dir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
