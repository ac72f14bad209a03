"""docs/deployment.md ('Deploy across sites') shows the commands the deployment test runs.

Every `flower-superlink`, `flower-superexec`, `flower-supernode`, `flwr supernode register` and
`flwr run` command in the page's bash blocks must use exactly the flags of the command that
`tests/deployment/harness.py` builds and the end-to-end test starts (values differ: hosts,
ports, paths; `--format`/`--stream` only change the output). docker/compose.tls.yml is held to
the same flags.
"""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

from tests.deployment.harness import (
    DEPLOY_DOC,
    REPO_ROOT,
    Material,
    flags_of,
    register_command,
    run_command,
    superexec_command,
    superlink_command,
    supernode_command,
)

PAGE_TITLE = "# Deploy across sites"
_M = Material(Path("/m"))
_ADDRESS = "127.0.0.1:1"

# Command prefix -> the flags of the command the end-to-end test runs.
EXPECTED_FLAGS: dict[tuple[str, ...], set[str]] = {
    ("flower-superlink",): flags_of(
        superlink_command(_M, host="127.0.0.1", port=1, database=Path("db"))
    ),
    ("flower-superexec",): flags_of(superexec_command(_M, superlink_address=_ADDRESS)),
    ("flower-supernode",): flags_of(
        supernode_command(_M, "s", superlink_address=_ADDRESS, port=2, node_config="x=1")
    ),
    ("flwr", "supernode", "register"): flags_of(register_command(Path("k.pub"), "c", "s")),
    ("flwr", "run"): flags_of(run_command(Path("."), "c", "x=1")),
}


def _page() -> str:
    """The text of the deployment page (it must still be that page, not a stub)."""
    text = DEPLOY_DOC.read_text()
    assert text.startswith(PAGE_TITLE + "\n"), f"{DEPLOY_DOC} must start with {PAGE_TITLE!r}"
    return text


def _blocks(markdown: str, language: str) -> list[str]:
    """Contents of the fenced code blocks of one language."""
    return re.findall(rf"```{language}\n(.*?)```", markdown, flags=re.DOTALL)


def _commands(markdown: str) -> list[list[str]]:
    """Every shell command of the bash blocks, continuation lines joined, split like a shell."""
    commands = []
    for block in _blocks(markdown, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                commands.append(shlex.split(line))
    return commands


@pytest.fixture(scope="module")
def page() -> str:
    """The deployment page's text."""
    return _page()


@pytest.mark.parametrize("prefix", list(EXPECTED_FLAGS), ids=" ".join)
def test_documented_commands_use_the_tested_flags(page: str, prefix: tuple[str, ...]) -> None:
    """Each documented command of this kind has exactly the flags the test runs it with."""
    found = [argv for argv in _commands(page) if tuple(argv[: len(prefix)]) == prefix]
    assert found, f"docs/deployment.md shows no `{' '.join(prefix)}` command"
    for argv in found:
        documented = flags_of(argv)
        expected = EXPECTED_FLAGS[prefix]
        assert documented == expected, (
            f"`{shlex.join(argv)}`: flags differ from the deployment test's; "
            f"missing {sorted(expected - documented)}, extra {sorted(documented - expected)}. "
            "Change tests/deployment/harness.py and docs/deployment.md together."
        )


def test_connection_entries_parse_and_name_the_ca(page: str) -> None:
    """Every `[superlink.NAME]` entry shown is valid TOML the flwr CLI accepts."""
    entries = {}
    for block in _blocks(page, "toml"):
        entries.update(tomllib.loads(block)["superlink"])
    assert {"compose", "compose-tls", "robustmerge"} <= set(entries), entries
    for name, entry in entries.items():
        assert "address" in entry, name
        if entry.get("insecure") is not True:
            assert Path(entry["root-certificates"]).is_absolute(), (
                f"[superlink.{name}] root-certificates must be absolute (flwr rejects others)"
            )
    for argv in _commands(page):
        if argv[:2] == ["flwr", "run"] or argv[:3] == ["flwr", "supernode", "register"]:
            connection = argv[3] if argv[1] == "run" else argv[4]
            assert connection in entries, f"`{shlex.join(argv)}` uses an undefined connection"


def _compose_command(path: Path, service: str) -> list[str]:
    """The command list of one service in a compose file."""
    data = yaml.safe_load(path.read_text())
    return [str(a) for a in data["services"][service]["command"]]


def test_compose_tls_uses_the_tested_flags() -> None:
    """compose.tls.yml starts the SuperLink, its SuperExec and the SuperNodes as the test does.

    The containerised SuperNodes add only `--isolation process` and `--host` (their ClientApp
    runs in a SuperExec container that reaches the Runtime API over the compose network).
    """
    tls = REPO_ROOT / "docker" / "compose.tls.yml"
    assert flags_of(_compose_command(tls, "superlink")) == EXPECTED_FLAGS[("flower-superlink",)]
    assert (
        flags_of(_compose_command(tls, "superexec-serverapp"))
        == EXPECTED_FLAGS[("flower-superexec",)]
    )
    for service in ("supernode-1", "supernode-2"):
        flags = flags_of(_compose_command(tls, service))
        assert flags - EXPECTED_FLAGS[("flower-supernode",)] == {"--isolation", "--host"}
        assert EXPECTED_FLAGS[("flower-supernode",)] <= flags
