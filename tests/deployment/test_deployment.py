"""The deployment topology as real processes on 127.0.0.1: TLS, SuperNode auth, two sites.

What runs (the same commands as the README's 'Deploy across sites', built in harness.py):

- `docker/certs/generate.sh` makes a fresh CA, server certificate and three SuperNode key
  pairs in a temp dir;
- `flower-superlink` with TLS, `--enable-supernode-auth`, `--isolation process` and a
  SuperExec shared secret, plus the `flower-superexec` that runs its ServerApps;
- `flwr supernode register` for two of the three public keys;
- two `flower-supernode`s with `--root-certificates` and their private keys;
- a third SuperNode whose key was never registered: it must be refused and get no task;
- a SuperExec without the shared secret: it must be refused too;
- `flwr run` of a numpy probe app (proves the topology on its own), then of this project's
  app for 2 short rounds; both must finish and write checkpoints and metrics.

Every wait is bounded by one deadline for the module, and the fixture's `process_set`
ends every process group and descendant at the end, also when a test fails.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from flwr.supercore.exit import ExitCode

from tests.deployment.harness import (
    REPO_ROOT,
    Deadline,
    DeadlineExceededError,
    Material,
    Proc,
    ProcessSet,
    connection_toml,
    free_ports,
    make_material,
    process_env,
    process_set,
    register_command,
    run_cli,
    run_command,
    superexec_command,
    superlink_command,
    supernode_command,
)

pytestmark = pytest.mark.deployment

# The whole module (setup, its three runs, teardown excluded) must finish within this budget. On
# the 2-core VM the module takes about 150 s idle and reached 300 s under load (the secure run
# finishing just as a 300 s budget ran out), so the bound leaves room for a busy machine.
MODULE_BUDGET_S = 600.0
CONNECTION = "robustmerge"
SITES = ("site-1", "site-2")
ROGUE = "site-rogue"

# The tiny configuration of the real app (issue 5): 2 rounds on 16 examples per client.
APP_RUN_CONFIG = {
    "num-server-rounds": 2,
    "train-examples": 16,
    "eval-examples": 16,
    "max-length": 32,
    "fraction-evaluate": 0.0,
    "min-train-nodes": 2,
}

PROBE_PYPROJECT = """\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "deploy-probe"
version = "0.1.0"
dependencies = ["flwr>=1.42,<1.43", "numpy"]

[tool.flwr.app]
publisher = "robustmerge-fl"

[tool.flwr.app.components]
serverapp = "probe_app.server:app"
clientapp = "probe_app.client:app"

[tool.flwr.app.config]
num-server-rounds = 2
min-train-nodes = 2
output-dir = "outputs"
"""


@dataclass
class Federation:
    """Handles on the running federation, shared by the tests of this module."""

    tmp: Path
    material: Material
    env: dict[str, str]
    procs: ProcessSet
    deadline: Deadline
    superlink: Proc
    node_ids: dict[str, int]
    rogue: Proc
    rogue_superexec: Proc

    def cli(self, argv: list[str]) -> str:
        """Run a flwr CLI call against the federation; return its stdout."""
        return run_cli(argv, self.env, self.deadline, cwd=self.tmp).stdout

    def fail(self, message: str) -> None:
        """Fail with every process's log tail attached."""
        pytest.fail(f"{message}\n{self.procs.logs()}", pytrace=False)


def _toml_value(value: object) -> str:
    """A run-config override value as TOML (strings quoted, booleans lower case)."""
    return json.dumps(value)


def _run_config(values: dict[str, object]) -> str:
    """The `--run-config` argument for `flwr run`: space-separated key=value pairs."""
    return " ".join(f"{key}={_toml_value(value)}" for key, value in values.items())


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    """Start SuperLink + SuperExec + two registered SuperNodes, and the two intruders."""
    tmp = tmp_path_factory.mktemp("deployment")
    deadline = Deadline(MODULE_BUDGET_S)
    material = make_material(tmp / "certs", [*SITES, ROGUE])
    link_port, *node_ports = free_ports(1 + len(SITES) + 1)
    address = f"127.0.0.1:{link_port}"

    flwr_home = tmp / "flwr-home"
    flwr_home.mkdir()
    (flwr_home / "config.toml").write_text(connection_toml(CONNECTION, address, material.ca_cert))
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
        for site in SITES:
            out = run_cli(
                register_command(material.public_key(site), CONNECTION, site), env, deadline
            )
            node_ids[site] = int(json.loads(out.stdout)["node-id"])

        supernodes = [
            procs.start(
                site,
                supernode_command(
                    material,
                    site,
                    superlink_address=address,
                    port=port,
                    node_config=f"partition-id={index} num-partitions={len(SITES)}",
                ),
            )
            for index, (site, port) in enumerate(zip(SITES, node_ports, strict=False))
        ]
        for site, node in zip(SITES, supernodes, strict=True):
            match = node.wait_for(r"SuperNode ID: (\d+)", deadline, "a node ID from the SuperLink")
            assert int(match.group(1)) == node_ids[site], (
                f"{site} connected as node {match.group(1)}, but its key was registered as "
                f"node {node_ids[site]}"
            )

        # Same CA, a well-formed key pair, but the public key was never registered.
        rogue = procs.start(
            ROGUE,
            supernode_command(
                material,
                ROGUE,
                superlink_address=address,
                port=node_ports[-1],
                node_config=f"partition-id=0 num-partitions={len(SITES)}",
            ),
        )
        # Trusts the CA but lacks the shared secret: must not get ServerApp tasks.
        rogue_superexec = procs.start(
            "superexec-without-secret",
            [
                "flower-superexec",
                "--runtime-api-address",
                address,
                "--root-certificates",
                str(material.ca_cert),
            ],
        )
        yield Federation(
            tmp=tmp,
            material=material,
            env=env,
            procs=procs,
            deadline=deadline,
            superlink=superlink,
            node_ids=node_ids,
            rogue=rogue,
            rogue_superexec=rogue_superexec,
        )


def _start_run(fed: Federation, app_dir: Path, run_config: dict[str, object]) -> int:
    """`flwr run` the app against the federation; return the run ID."""
    stdout = fed.cli(run_command(app_dir, CONNECTION, _run_config(run_config)))
    payload = json.loads(stdout[stdout.index("{") :])
    assert payload["success"], stdout
    return int(payload["run-id"])


def _wait_finished(fed: Federation, run_id: int) -> str:
    """Poll `flwr ls --run-id` until the run is finished; return its status."""
    status = ""
    while not fed.deadline.expired():
        stdout = fed.cli(["flwr", "ls", CONNECTION, "--run-id", str(run_id), "--format", "json"])
        runs = json.loads(stdout[stdout.index("{") :])["runs"]
        status = str(runs[0]["status"]) if runs else ""
        if status.startswith("finished"):
            return status
        if fed.superlink.popen.poll() is not None:
            fed.fail(f"the SuperLink exited during run {run_id}")
        time.sleep(2.0)
    raise DeadlineExceededError(
        f"run {run_id} not finished within the deadline (last status {status!r})\n"
        f"{_run_log(fed, run_id)}\n{fed.procs.logs()}"
    )


def _run_log(fed: Federation, run_id: int) -> str:
    """The run's ServerApp log as the SuperLink keeps it (for failure messages)."""
    try:
        return fed.cli(["flwr", "log", str(run_id), CONNECTION, "--show"])
    except AssertionError as err:
        return f"(flwr log failed: {err})"


def _replying_nodes(fed: Federation) -> set[int]:
    """Node IDs the SuperLink accepted replies from, read from its log."""
    return {int(m) for m in re.findall(r"Push replies from node_id=(\d+)", fed.superlink.log())}


def test_unregistered_supernode_is_refused(federation: Federation) -> None:
    """A SuperNode with an unregistered key is turned away at activation and never connects."""
    fed = federation
    code = fed.rogue.wait_exit(fed.deadline)
    flower_code = f"Exit Code: {int(ExitCode.SUPERNODE_CONNECTION_ERROR)}"
    assert code != 0, f"the unregistered SuperNode exited with 0\n{fed.rogue.tail()}"
    assert flower_code in fed.rogue.log(), (
        f"expected '{flower_code}' (could not connect) in the log of the unregistered "
        f"SuperNode\n{fed.rogue.tail()}"
    )
    assert "Failed to activate SuperNode" in fed.rogue.log(), fed.rogue.tail()
    assert "SuperNode ID:" not in fed.rogue.log(), fed.rogue.tail()
    assert re.search(r"activate-node\]\[ApiError:\d+\].*No SuperNode found", fed.superlink.log())

    stdout = fed.cli(["flwr", "supernode", "ls", CONNECTION, "--format", "json"])
    nodes = json.loads(stdout[stdout.index("{") :])["nodes"]
    listed = {int(node["node-id"]): node["status"] for node in nodes}
    assert set(listed) == set(fed.node_ids.values()), (
        f"the SuperLink lists nodes {listed}, expected exactly the registered {fed.node_ids}"
    )
    assert all(status == "online" for status in listed.values()), listed


def test_superexec_without_secret_is_refused(federation: Federation) -> None:
    """A SuperExec that trusts the CA but lacks the shared secret cannot take tasks."""
    fed = federation
    fed.superlink.wait_for(r"ApiError:\d+\] SuperExec authentication failed", fed.deadline)
    fed.rogue_superexec.wait_exit(fed.deadline)


def test_probe_app_runs_on_registered_nodes_only(federation: Federation) -> None:
    """The numpy probe app finishes 2 rounds; only the two registered SuperNodes took part."""
    fed = federation
    app_dir = fed.tmp / "probe"
    app_dir.mkdir()
    (app_dir / "pyproject.toml").write_text(PROBE_PYPROJECT)
    shutil.copytree(
        Path(__file__).parent / "probe_app",
        app_dir / "probe_app",
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
    )
    out = fed.tmp / "probe-outputs"
    run_id = _start_run(fed, app_dir, {"output-dir": str(out)})
    status = _wait_finished(fed, run_id)
    if status != "finished:completed":
        fed.fail(f"probe run {run_id} ended as {status}\n{_run_log(fed, run_id)}")

    registered = sorted(fed.node_ids.values())
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["sent-to"] == registered
    assert [r["replied"] for r in metrics["rounds"]] == [registered, registered]
    # Round 1: 0 + {1, 2} -> 1.5; round 2: 1.5 + {1, 2} -> 3.0 (partition-id + 1 added).
    assert [r["weights"] for r in metrics["rounds"]] == [[1.5] * 4, [3.0] * 4]
    for server_round in (1, 2):
        assert (out / "checkpoints" / f"round-{server_round:04d}" / "state.json").is_file()
    assert _replying_nodes(fed) <= set(registered)
    assert "Receiving:" not in fed.rogue.log()


def test_robustmerge_app_runs_two_rounds(federation: Federation) -> None:
    """This project's app: 2 short rounds over TLS with node auth; checkpoints and metrics."""
    fed = federation
    out = fed.tmp / "app-outputs"
    run_id = _start_run(fed, REPO_ROOT, {**APP_RUN_CONFIG, "output-dir": str(out)})
    status = _wait_finished(fed, run_id)
    if status != "finished:completed":
        fed.fail(f"run {run_id} ended as {status}\n{_run_log(fed, run_id)}")

    missing = [
        str(path.relative_to(out))
        for server_round in (1, 2)
        for name in ("adapter_model.safetensors", "adapter_config.json", "state.json")
        if not (path := out / "checkpoints" / f"round-{server_round:04d}" / name).is_file()
    ]
    assert not missing, f"missing in {out}: {missing}\n{_run_log(fed, run_id)}"
    assert (out / "final").is_dir(), f"no final/ in {out}"
    assert (out / "final" / "adapter_model.safetensors").is_file(), f"no final adapter in {out}"
    metrics = json.loads((out / "metrics.json").read_text())
    rounds = {r.get("server-round"): r for r in metrics.get("rounds", [])}
    assert {1, 2} <= set(rounds), f"metrics.json has rounds {sorted(rounds, key=str)}"
    registered = sorted(fed.node_ids.values())
    for server_round in (1, 2):
        accepted = sorted(rounds[server_round].get("merge", {}).get("accepted-nodes", []))
        assert accepted == registered, (
            f"round {server_round} merged the updates of {accepted}, expected exactly the "
            f"registered SuperNodes {registered} (metrics.json: rounds[].merge.accepted-nodes)"
        )
    assert _replying_nodes(fed) == set(registered)
    assert "Receiving:" not in fed.rogue.log()


def test_secure_aggregation_runs_over_tls(federation: Federation) -> None:
    """RobustMerge under SecAgg+ across the two registered SuperNodes, over TLS with node auth:
    the round completes with both sites summed and nothing clipped."""
    fed = federation
    out = fed.tmp / "secure-outputs"
    run_config = {
        **APP_RUN_CONFIG,
        "num-server-rounds": 1,
        "server-eval": False,
        "secure-aggregation": True,
        # two sites: every client shares with the other (fractions of the sampled clients)
        "secagg-num-shares": 1.0,
        "secagg-reconstruction-threshold": 1.0,
        "output-dir": str(out),
    }
    run_id = _start_run(fed, REPO_ROOT, run_config)
    status = _wait_finished(fed, run_id)
    if status != "finished:completed":
        fed.fail(f"run {run_id} ended as {status}\n{_run_log(fed, run_id)}")
    metrics = json.loads((out / "metrics.json").read_text())
    (entry,) = [r for r in metrics["rounds"] if r.get("server-round") == 1]
    assert entry["merge"]["secure-aggregation"] == "completed", entry
    assert entry["merge"]["clients-summed"] == 2
    assert sorted(entry["merge"]["accepted-nodes"]) == sorted(fed.node_ids.values())
    assert entry["train"]["secagg-clipped-clients"] == 0
    assert (out / "final" / "adapter_model.safetensors").is_file()
    traffic = entry["communication"]
    assert traffic["uplink"] == "secure-aggregation"
    assert set(traffic["train-up-bytes"]) == {str(n) for n in fed.node_ids.values()}
