"""Real-process harness for the deployment tests: TLS material, ports, Flower CLIs, cleanup.

Why a module of its own: the end-to-end test starts exactly the commands built here, and
`test_docs.py` checks that the docs page 'Deploy across sites' (docs/deployment.md) shows the
same commands with the same flags. One source for both keeps the docs and the test from
drifting apart.

Every process is started in its own session (process group) and `ProcessSet.stop_all`
ends each group and every descendant found under it (the Flower CLIs spawn SuperExec and
ServerApp/ClientApp processes, some in new sessions), so nothing outlives the test, on
success or failure. Every wait is bounded by a `Deadline`.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
GENERATE_SH = REPO_ROOT / "docker" / "certs" / "generate.sh"
DEPLOY_DOC = REPO_ROOT / "docs" / "deployment.md"

# Flags that only change how a CLI prints, not what it does: the docs may differ here.
OUTPUT_ONLY_FLAGS = frozenset({"--format", "--stream"})


class DeadlineExceededError(AssertionError):
    """A bounded wait ran out; the message says what was awaited and shows the logs."""


@dataclass
class Deadline:
    """A point in time shared by every wait of one test, so the whole test stays bounded.

    Parameters
    ----------
    seconds : float
        Budget from now.
    """

    seconds: float
    start: float = field(default_factory=time.monotonic)

    def remaining(self) -> float:
        """Seconds left (never negative)."""
        return max(0.0, self.start + self.seconds - time.monotonic())

    def elapsed(self) -> float:
        """Seconds since the deadline was created."""
        return time.monotonic() - self.start

    def expired(self) -> bool:
        """Whether the budget is spent."""
        return self.remaining() <= 0.0


@dataclass(frozen=True)
class Material:
    """Paths of what `docker/certs/generate.sh all --out ROOT` writes.

    The names are the ones the compose files and docs/deployment.md use.
    """

    root: Path

    @property
    def ca_cert(self) -> Path:
        """CA certificate: given to every SuperNode, SuperExec and flwr CLI."""
        return self.root / "tls" / "ca.crt"

    @property
    def server_cert(self) -> Path:
        """SuperLink certificate (SAN: localhost, 127.0.0.1 and the --san list)."""
        return self.root / "tls" / "server.pem"

    @property
    def server_key(self) -> Path:
        """SuperLink private key."""
        return self.root / "tls" / "server.key"

    @property
    def superexec_secret(self) -> Path:
        """Shared secret that the SuperLink's SuperExec signs Runtime API calls with."""
        return self.root / "tls" / "superexec.secret"

    def private_key(self, name: str) -> Path:
        """SuperNode private key (stays on the site)."""
        return self.root / "keys" / name

    def public_key(self, name: str) -> Path:
        """SuperNode public key (registered at the SuperLink)."""
        return self.root / "keys" / f"{name}.pub"


def make_material(out: Path, node_names: Sequence[str], san: str = "") -> Material:
    """Run the project's certificate script, as a user would, into `out`.

    Parameters
    ----------
    out : Path
        Output directory (fresh).
    node_names : Sequence[str]
        One SuperNode key pair per name.
    san : str (default: "")
        Extra SANs for the server certificate, e.g. "DNS:superlink".
    """
    argv = ["bash", str(GENERATE_SH), "all", "--out", str(out), "--names", " ".join(node_names)]
    if san:
        argv += ["--san", san]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0:
        raise AssertionError(
            f"{shlex.join(argv)} failed with exit code {done.returncode}:\n"
            f"{done.stdout}\n{done.stderr}"
        )
    return Material(out)


def free_ports(count: int) -> list[int]:
    """Return `count` distinct TCP ports that were free on 127.0.0.1 a moment ago.

    All sockets are held open until every port is picked, so no port is returned twice.
    """
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind(("127.0.0.1", 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


# --- the commands: docs/deployment.md shows these with the same flags -----------------


def superlink_command(material: Material, *, host: str, port: int, database: Path) -> list[str]:
    """SuperLink with TLS, SuperNode authentication and its own, authenticated SuperExec.

    `--isolation process` plus `--superexec-auth-secret-file`: since Flower 1.41 the Runtime
    API shares the one port with the Fleet and Control APIs, so on a reachable host only a
    SuperExec that holds the secret may take ServerApp tasks.
    """
    return [
        "flower-superlink",
        "--ssl-ca-certfile",
        str(material.ca_cert),
        "--ssl-certfile",
        str(material.server_cert),
        "--ssl-keyfile",
        str(material.server_key),
        "--enable-supernode-auth",
        "--isolation",
        "process",
        "--superexec-auth-secret-file",
        str(material.superexec_secret),
        "--database",
        str(database),
        "--host",
        host,
        "--port",
        str(port),
    ]


def superexec_command(material: Material, *, superlink_address: str) -> list[str]:
    """The SuperExec that runs ServerApps for the SuperLink (TLS + shared secret)."""
    return [
        "flower-superexec",
        "--runtime-api-address",
        superlink_address,
        "--root-certificates",
        str(material.ca_cert),
        "--superexec-auth-secret-file",
        str(material.superexec_secret),
    ]


def supernode_command(
    material: Material, name: str, *, superlink_address: str, port: int, node_config: str
) -> list[str]:
    """A site's SuperNode: verifies the SuperLink with the CA, signs in with its key.

    `--port` is the SuperNode's local Runtime API port (127.0.0.1 only); it must differ
    between SuperNodes that share a host.
    """
    return [
        "flower-supernode",
        "--superlink",
        superlink_address,
        "--root-certificates",
        str(material.ca_cert),
        "--auth-supernode-private-key",
        str(material.private_key(name)),
        "--node-config",
        node_config,
        "--port",
        str(port),
    ]


def register_command(public_key: Path, connection: str, name: str) -> list[str]:
    """Register a site's public key at the SuperLink (run by the SuperLink operator)."""
    return [
        "flwr",
        "supernode",
        "register",
        str(public_key),
        connection,
        "--name",
        name,
        "--format",
        "json",
    ]


def run_command(app_dir: Path, connection: str, run_config: str) -> list[str]:
    """Submit the app to the SuperLink named by `connection` in $FLWR_HOME/config.toml."""
    return [
        "flwr",
        "run",
        str(app_dir),
        connection,
        "--run-config",
        run_config,
        "--format",
        "json",
    ]


def connection_toml(name: str, address: str, ca_cert: Path) -> str:
    """The `[superlink.NAME]` entry of $FLWR_HOME/config.toml that the flwr CLI reads."""
    return (
        "[superlink]\n"
        f'default = "{name}"\n\n'
        f"[superlink.{name}]\n"
        f'address = "{address}"\n'
        f'root-certificates = "{ca_cert}"\n'
    )


def flags_of(argv: Sequence[str]) -> set[str]:
    """The `--flag` names of a command line, without values or output-only flags."""
    return {a.split("=", 1)[0] for a in argv if a.startswith("--")} - OUTPUT_ONLY_FLAGS


# --- processes ------------------------------------------------------------------------


def process_env(flwr_home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for every Flower process of a test.

    An isolated FLWR_HOME (never the user's ~/.flwr), no `uv sync` at run time (the app's
    dependencies are already installed), no Hugging Face hub access, no telemetry or update
    check (there is no network), and this interpreter's bin directory first on PATH so the
    Flower CLIs spawn the matching `flower-superexec`/`flwr-clientapp`.
    """
    env = dict(os.environ)
    env.update(
        {
            "FLWR_HOME": str(flwr_home),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        }
    )
    env.pop("VIRTUAL_ENV_PROMPT", None)
    if extra:
        env.update(extra)
    return env


def run_cli(
    argv: Sequence[str], env: Mapping[str, str], deadline: Deadline, *, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a short CLI call to completion within the deadline; raise with its output if it fails."""
    timeout = max(1.0, min(120.0, deadline.remaining()))
    try:
        done = subprocess.run(
            list(argv),
            env=dict(env),
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as err:
        raise DeadlineExceededError(
            f"{shlex.join(argv)} did not finish within {timeout:.0f} s"
        ) from err
    if done.returncode != 0:
        raise AssertionError(
            f"{shlex.join(argv)} failed with exit code {done.returncode}\n"
            f"--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"
        )
    return done


def _children_map() -> dict[int, list[int]]:
    """Parent pid -> child pids, read from /proc (Linux)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None:
            children.setdefault(stat[1], []).append(int(entry.name))
    return children


def descendants(pid: int) -> list[int]:
    """All live descendants of `pid` (children, grandchildren, ...)."""
    children = _children_map()
    found: list[int] = []
    stack = [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def set_subreaper(on: bool) -> bool | None:
    """Switch Linux's `PR_SET_CHILD_SUBREAPER` for this process; return the previous setting.

    Why: a Flower process that dies first leaves its SuperExec to the machine's init, which
    in a container may never reap it. While subreaper, this process adopts such orphans, so
    `ProcessSet.stop_all` can end and reap them and the test leaves neither running nor zombie
    processes behind. `ProcessSet` switches it on for its lifetime only and restores the
    previous setting, so other tests see the usual orphan handling. Returns None where the
    call is not available.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        previous = ctypes.c_int(0)
        if libc.prctl(37, ctypes.byref(previous), 0, 0, 0) != 0:  # PR_GET_CHILD_SUBREAPER
            return None
        if libc.prctl(36, int(on), 0, 0, 0) != 0:  # PR_SET_CHILD_SUBREAPER
            return None
        return bool(previous.value)
    except (OSError, AttributeError):
        return None


def _stat(pid: int) -> tuple[str, int, str] | None:
    """(command name, parent pid, state) of `pid` from /proc, or None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    head, _, rest = raw.rpartition(")")
    fields = rest.split()
    return head.partition("(")[2], int(fields[1]), fields[0]


def _flower_children() -> set[int]:
    """Children of this process whose command is a Flower CLI, alive or zombie."""
    me = os.getpid()
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None:
            name, ppid, _ = stat
            if ppid == me and name.startswith(("flower-", "flwr")):
                found.add(int(entry.name))
    return found


def _reap(pid: int) -> None:
    """Collect the exit status of `pid` if it is a finished child of this process."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def _alive(pid: int) -> bool:
    """Whether `pid` exists and is not a zombie."""
    stat = _stat(pid)
    return stat is not None and stat[2] != "Z"


@dataclass
class Proc:
    """One started process with its log file."""

    name: str
    argv: list[str]
    popen: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        """Everything the process wrote so far (stdout and stderr together)."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def tail(self, lines: int = 40) -> str:
        """The last lines of the log, for failure messages."""
        return "\n".join(self.log().splitlines()[-lines:])

    def wait_for(self, pattern: str, deadline: Deadline, what: str = "") -> re.Match[str]:
        """Poll the log until `pattern` (a regex) appears; fail if the process exits first."""
        regex = re.compile(pattern)
        while True:
            if match := regex.search(self.log()):
                return match
            if self.popen.poll() is not None:
                raise AssertionError(
                    f"{self.name} exited with code {self.popen.returncode} before "
                    f"{what or pattern!r}\n--- {self.name} log\n{self.tail()}"
                )
            if deadline.expired():
                raise DeadlineExceededError(
                    f"{self.name}: no {what or pattern!r} within the deadline\n"
                    f"--- {self.name} log\n{self.tail()}"
                )
            time.sleep(0.25)

    def wait_exit(self, deadline: Deadline) -> int:
        """Wait until the process exits; return its exit code."""
        try:
            return self.popen.wait(timeout=max(0.1, deadline.remaining()))
        except subprocess.TimeoutExpired as err:
            raise DeadlineExceededError(
                f"{self.name} still runs at the deadline\n--- {self.name} log\n{self.tail()}"
            ) from err


class ProcessSet:
    """Starts long-running processes and guarantees they are all ended (`stop_all`)."""

    def __init__(self, log_dir: Path, env: Mapping[str, str]) -> None:
        self.log_dir = log_dir
        self.env = dict(env)
        self.procs: list[Proc] = []
        log_dir.mkdir(parents=True, exist_ok=True)
        self._was_subreaper = set_subreaper(True)
        # Flower processes that other tests or fixtures started are not this set's to end.
        self._foreign = _flower_children()

    def start(self, name: str, argv: Sequence[str], *, cwd: Path | None = None) -> Proc:
        """Start `argv` in a new session, with stdout and stderr going to `<log_dir>/<name>.log`."""
        log_path = self.log_dir / f"{name}.log"
        with log_path.open("wb") as log_file:
            popen = subprocess.Popen(
                list(argv),
                env=self.env,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        proc = Proc(name=name, argv=list(argv), popen=popen, log_path=log_path)
        self.procs.append(proc)
        return proc

    def logs(self, lines: int = 40) -> str:
        """Tails of all logs, for a failure message."""
        return "\n".join(
            f"--- {p.name} ({shlex.join(p.argv)})\n{p.tail(lines)}" for p in self.procs
        )

    def stop(self, proc: Proc, grace: float = 10.0) -> None:
        """End one started process, its process group and its descendants (e.g. a SuperNode a
        test restarts): SIGTERM first (a SuperNode then deactivates itself at the SuperLink),
        SIGKILL for whatever is left after `grace` seconds. Raises if anything survives."""
        targets = {proc.popen.pid, *descendants(proc.popen.pid)}
        for pid in list(targets):
            targets.update(descendants(pid))

        def send(sig: signal.Signals, pids: set[int]) -> None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.popen.pid, sig)
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)

        send(signal.SIGTERM, targets)
        end = time.monotonic() + grace
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.popen.wait(timeout=max(0.1, end - time.monotonic()))
        while time.monotonic() < end and any(_alive(pid) for pid in targets):
            time.sleep(0.1)
        send(signal.SIGKILL, {pid for pid in targets if _alive(pid)})
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.popen.wait(timeout=5)
        deadline = time.monotonic() + 5
        while True:
            for pid in targets - {proc.popen.pid}:
                _reap(pid)
            leftover = sorted(pid for pid in targets if _alive(pid))
            if not leftover:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"{proc.name}: processes {leftover} survived SIGKILL")
            time.sleep(0.1)

    def _adopted(self) -> set[int]:
        """Orphans of this set's processes that this (subreaper) process adopted."""
        popen_pids = {proc.popen.pid for proc in self.procs}
        return _flower_children() - self._foreign - popen_pids

    def _signal_all(self, targets: set[int], sig: signal.Signals) -> None:
        """Send `sig` to every started process group and to every pid in `targets`."""
        for proc in reversed(self.procs):
            # A group stays addressable while any member lives, even after its leader exited.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.popen.pid, sig)
        for pid in targets:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)

    def stop_all(self, grace: float = 10.0) -> list[int]:
        """End every started process, its process group and all descendants.

        SIGTERM first (Flower shuts down cleanly on it), SIGKILL for whatever is left after
        `grace` seconds, then the adopted orphans are reaped. Returns the pids still alive
        afterwards (expected: none).
        """
        targets: set[int] = self._adopted()
        for proc in self.procs:
            targets.add(proc.popen.pid)
            targets.update(descendants(proc.popen.pid))
        for pid in list(targets):
            targets.update(descendants(pid))
        self._signal_all(targets, signal.SIGTERM)
        end = time.monotonic() + grace
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(timeout=max(0.1, end - time.monotonic()))
        while time.monotonic() < end and any(_alive(pid) for pid in targets):
            time.sleep(0.1)
        self._signal_all({pid for pid in targets if _alive(pid)}, signal.SIGKILL)
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(timeout=5)
        popen_pids = {proc.popen.pid for proc in self.procs}
        deadline = time.monotonic() + 5
        while True:
            for pid in (targets | self._adopted()) - popen_pids:
                _reap(pid)
            leftover = sorted(pid for pid in targets if _alive(pid))
            if not leftover or time.monotonic() > deadline:
                if self._was_subreaper is not None:
                    set_subreaper(self._was_subreaper)
                return leftover
            time.sleep(0.1)


@contextlib.contextmanager
def process_set(log_dir: Path, env: Mapping[str, str]) -> Iterator[ProcessSet]:
    """`ProcessSet` as a context manager: processes end when the block ends, however it ends."""
    procs = ProcessSet(log_dir, env)
    failed = False
    try:
        yield procs
    except BaseException:
        failed = True
        raise
    finally:
        leftover = procs.stop_all()
        if leftover and not failed:
            raise AssertionError(f"processes {leftover} survived SIGKILL\n{procs.logs()}")


# --- a running federation: SuperLink, SuperExec, registered SuperNodes ------------------


def run_config_arg(values: Mapping[str, object]) -> str:
    """The `--run-config` argument for `flwr run`: space-separated key=value pairs, each value
    as TOML (strings quoted, booleans lower case)."""
    return " ".join(f"{key}={json.dumps(value)}" for key, value in values.items())


@dataclass
class Federation:
    """Handles on a running federation (`start_federation`), shared by a module's tests.

    `spare_ports` are free ports left for SuperNodes a test starts itself (e.g. an
    unregistered one); `extra` holds such processes by name.
    """

    tmp: Path
    material: Material
    env: dict[str, str]
    procs: ProcessSet
    deadline: Deadline
    connection: str
    address: str
    superlink: Proc
    node_ids: dict[str, int]
    spare_ports: list[int]
    extra: dict[str, Proc] = field(default_factory=dict)

    def cli(self, argv: list[str]) -> str:
        """Run a flwr CLI call against the federation; return its stdout."""
        return run_cli(argv, self.env, self.deadline, cwd=self.tmp).stdout

    def fail(self, message: str) -> None:
        """Fail with every process's log tail attached."""
        import pytest

        pytest.fail(f"{message}\n{self.procs.logs()}", pytrace=False)

    def start_run(self, app_dir: Path, run_config: Mapping[str, object]) -> int:
        """`flwr run` the app against the federation; return the run ID."""
        stdout = self.cli(run_command(app_dir, self.connection, run_config_arg(run_config)))
        payload = json.loads(stdout[stdout.index("{") :])
        assert payload["success"], stdout
        return int(payload["run-id"])

    def wait_finished(self, run_id: int) -> str:
        """Poll `flwr ls --run-id` until the run is finished; return its status."""
        status = ""
        while not self.deadline.expired():
            stdout = self.cli(
                ["flwr", "ls", self.connection, "--run-id", str(run_id), "--format", "json"]
            )
            runs = json.loads(stdout[stdout.index("{") :])["runs"]
            status = str(runs[0]["status"]) if runs else ""
            if status.startswith("finished"):
                return status
            if self.superlink.popen.poll() is not None:
                self.fail(f"the SuperLink exited during run {run_id}")
            time.sleep(2.0)
        raise DeadlineExceededError(
            f"run {run_id} not finished within the deadline (last status {status!r})\n"
            f"{self.run_log(run_id)}\n{self.procs.logs()}"
        )

    def run_log(self, run_id: int) -> str:
        """The run's ServerApp log as the SuperLink keeps it (for failure messages)."""
        try:
            return self.cli(["flwr", "log", str(run_id), self.connection, "--show"])
        except AssertionError as err:
            return f"(flwr log failed: {err})"

    def supernode(self, site: str) -> Proc:
        """The SuperNode process of `site` now: the latest started under its name (or
        `restart_supernode`'s `<site>-restart-<n>`)."""
        mine = [
            p for p in self.procs.procs if p.name == site or p.name.startswith(f"{site}-restart-")
        ]
        if not mine:
            raise KeyError(f"no SuperNode was started for {site!r}")
        return mine[-1]

    def restart_supernode(self, site: str) -> Proc:
        """Stop `site`'s SuperNode (SIGTERM, as an operator would) and start it again with the
        same command: the same key, local port and node config. Returns the new process (log
        `<site>-restart-<n>.log`) once the SuperLink has taken it back as its registered node
        ID."""
        old = self.supernode(site)
        self.procs.stop(old)
        # Flower 1.42's SuperNode does not deactivate itself on SIGTERM: the SuperLink refuses
        # to activate its key again ("could not be activated", exit code 305) until it marks
        # the node offline, once its heartbeats stop (up to 2 x 30 s). An operator waits too.
        self.wait_node_status(site, "offline")
        restarts = sum(p.name.startswith(f"{site}-restart-") for p in self.procs.procs)
        new = self.procs.start(f"{site}-restart-{restarts + 1}", old.argv)
        match = new.wait_for(r"SuperNode ID: (\d+)", self.deadline, "a node ID after the restart")
        assert int(match.group(1)) == self.node_ids[site], (
            f"{site} came back as node {match.group(1)}, but its key was registered as node "
            f"{self.node_ids[site]}"
        )
        return new

    def node_status(self, site: str) -> str:
        """`site`'s node status at the SuperLink (`flwr supernode list`: "online", "offline",
        ...; "" when not listed)."""
        stdout = self.cli(["flwr", "supernode", "list", self.connection, "--format", "json"])
        nodes = json.loads(stdout[stdout.index("{") :])["nodes"]
        wanted = str(self.node_ids[site])
        return next((str(n["status"]) for n in nodes if str(n["node-id"]) == wanted), "")

    def wait_node_status(self, site: str, status: str) -> None:
        """Poll `node_status` until `site`'s node has `status`, within the deadline."""
        last = ""
        while not self.deadline.expired():
            last = self.node_status(site)
            if last == status:
                return
            time.sleep(2.0)
        raise DeadlineExceededError(
            f"{site} (node {self.node_ids[site]}) not {status!r} within the deadline (last "
            f"{last!r})\n{self.procs.logs()}"
        )

    def replying_nodes(self) -> set[int]:
        """Node IDs the SuperLink accepted replies from, read from its log."""
        found = re.findall(r"Push replies from node_id=(\d+)", self.superlink.log())
        return {int(m) for m in found}


@contextlib.contextmanager
def start_federation(
    tmp: Path,
    sites: Mapping[str, str],
    deadline: Deadline,
    *,
    connection: str,
    unregistered: Sequence[str] = (),
) -> Iterator[Federation]:
    """SuperLink + SuperExec and one registered, connected SuperNode per entry of `sites`
    (name -> its `--node-config`), as real processes on 127.0.0.1 with TLS and node auth.

    Key pairs are made for `unregistered` names too (never registered; the test starts such
    nodes itself on `Federation.spare_ports`). Every process ends when the block ends.
    """
    material = make_material(tmp / "certs", [*sites, *unregistered])
    link_port, *node_ports = free_ports(1 + len(sites) + len(unregistered))
    address = f"127.0.0.1:{link_port}"

    flwr_home = tmp / "flwr-home"
    flwr_home.mkdir()
    (flwr_home / "config.toml").write_text(connection_toml(connection, address, material.ca_cert))
    (tmp / "state").mkdir()
    env = process_env(flwr_home)

    with process_set(tmp / "logs", env) as procs:
        superlink = procs.start(
            "superlink",
            superlink_command(
                material, host="127.0.0.1", port=link_port, database=tmp / "state" / "link.db"
            ),
        )
        superlink.wait_for(r"Uvicorn running on https://", deadline, "the SuperLink on HTTPS")
        procs.start("superexec", superexec_command(material, superlink_address=address))

        node_ids: dict[str, int] = {}
        for site in sites:
            out = run_cli(
                register_command(material.public_key(site), connection, site), env, deadline
            )
            node_ids[site] = int(json.loads(out.stdout)["node-id"])

        supernodes = [
            procs.start(
                site,
                supernode_command(
                    material, site, superlink_address=address, port=port, node_config=config
                ),
            )
            for (site, config), port in zip(sites.items(), node_ports, strict=False)
        ]
        for site, node in zip(sites, supernodes, strict=True):
            match = node.wait_for(r"SuperNode ID: (\d+)", deadline, "a node ID from the SuperLink")
            assert int(match.group(1)) == node_ids[site], (
                f"{site} connected as node {match.group(1)}, but its key was registered as "
                f"node {node_ids[site]}"
            )
        yield Federation(
            tmp=tmp,
            material=material,
            env=env,
            procs=procs,
            deadline=deadline,
            connection=connection,
            address=address,
            superlink=superlink,
            node_ids=node_ids,
            spare_ports=node_ports[len(sites) :],
        )
