"""Crash and resume: SIGKILL the server in the middle of a round, resume, get the same adapter.

Three real `flwr run` simulations through the README's wrapper (2 clients, 3 short rounds):
an uninterrupted run; a run whose server process (``flwr-simulation``, which hosts the
ServerApp) is killed with SIGKILL during round 2, after round 1's checkpoint was written; and the
same run restarted with ``resume=true``. The final adapter of the resumed run must be
bit-identical to the uninterrupted one (seeded sampling, seeded local training, merges in a
content-defined order).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from strategies.adapter_io.reading import read_adapter_dir
from tests.integration.simulation import ROOT, audit_verify, simulation_env

OVERRIDES = (
    "num-server-rounds=3 train-examples=32 max-length=32 server-eval=false "
    "seen-tasks='banking77,sentiment' seed=7"
)


def start(out: Path, home: Path, log: Path, extra: str = "") -> subprocess.Popen[bytes]:
    with log.open("wb") as stream:
        return subprocess.Popen(
            [
                "bash",
                str(ROOT / "scripts" / "run_simulation.sh"),
                "-c",
                f"{OVERRIDES} output-dir='{out}' {extra}",
            ],
            cwd=ROOT,
            env=simulation_env(home),
            stdout=stream,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def stop_group(process: subprocess.Popen[bytes]) -> None:
    """End the wrapper's whole session (SuperLink, simulation, Ray workers)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=20)
            time.sleep(1)
        except subprocess.TimeoutExpired:
            continue


def finish(process: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    try:
        process.wait(timeout=timeout)
    finally:
        stop_group(process)
    assert process.returncode == 0, log.read_text(errors="replace")[-4000:]


def server_pids(home: Path) -> list[int]:
    """The flwr-simulation processes (the ServerApp's host) started under this Flower home."""
    found = subprocess.run(["pgrep", "-f", "flwr-simulation"], capture_output=True, text=True)
    pids = []
    for pid in found.stdout.split():
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if f"FLWR_HOME={home}".encode() in environ.split(b"\0"):
            pids.append(int(pid))
    return pids


def wait_for(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.integration
def test_sigkill_mid_round_then_resume_matches_uninterrupted_run(tmp_path: Path) -> None:
    reference_out = tmp_path / "reference"
    log = tmp_path / "reference.log"
    finish(start(reference_out, tmp_path / "home-a", log), log, timeout=400)

    crashed_out = tmp_path / "crashed"
    home = tmp_path / "home-b"
    crash_log = tmp_path / "crash.log"
    process = start(crashed_out, home, crash_log)
    try:
        wait_for(
            lambda: (
                (crashed_out / "checkpoints" / "round-0001" / "state.json").exists()
                and "[ROUND 2/3]" in crash_log.read_text(errors="replace")
            ),
            timeout=400,
            what="round 1's checkpoint and the start of round 2",
        )
        pids = server_pids(home)
        assert pids, "no flwr-simulation process found"
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
    finally:
        stop_group(process)
    assert not (crashed_out / "final").exists()
    assert not (crashed_out / "checkpoints" / "round-0003").exists()

    resume_log = tmp_path / "resume.log"
    finish(start(crashed_out, home, resume_log, "resume=true"), resume_log, timeout=400)
    text = resume_log.read_text(errors="replace")
    assert "Resuming after round 1 " in text

    reference = read_adapter_dir(reference_out / "final").tensors
    resumed = read_adapter_dir(crashed_out / "final").tensors
    assert reference.keys() == resumed.keys()
    for key, value in reference.items():
        assert torch.equal(value, resumed[key]), key

    # The audit chain runs on through the crash and the resume, and agrees with the checkpoints.
    for out in (reference_out, crashed_out):
        verified = audit_verify(out)
        assert verified.returncode == 0, verified.stderr
    assert "1 resumes" in audit_verify(crashed_out).stdout
    assert last_global(reference_out) == last_global(crashed_out)


def last_global(run_dir: Path) -> list[str]:
    """The verifier summary's 'last global' line (the final adapter's digest)."""
    return [line for line in audit_verify(run_dir).stdout.splitlines() if "last global" in line]
