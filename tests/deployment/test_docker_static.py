"""Static checks of docker/: no Docker engine runs here, so what can be read is checked.

- every Dockerfile builds on Flower's official image of the flwr version the project uses,
  runs as a non-root user and starts the Flower CLI of its base image;
- the SuperExec image installs torch from the CPU index before anything else and ships the
  same workload packages as scripts/setup.sh;
- the compose files parse and name the expected services, ports, volumes and TLS mounts, and
  their addresses fit together (every `--runtime-api-address` points at a service and the port
  it listens on);
- docker/certs/generate.sh makes a CA, a server certificate with the right SANs and SuperNode
  key pairs that Flower loads, and never overwrites material unless told to.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import flwr
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    load_pem_private_key,
    load_ssh_private_key,
    load_ssh_public_key,
)
from cryptography.x509.oid import ExtendedKeyUsageOID
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from tests.deployment.harness import GENERATE_SH, REPO_ROOT

DOCKER = REPO_ROOT / "docker"
COMPOSE = DOCKER / "compose.yml"
COMPOSE_TLS = DOCKER / "compose.tls.yml"
COMPOSE_GPU = DOCKER / "compose.gpu.yml"
DOCKERFILES = sorted(DOCKER.glob("*.Dockerfile"))

# Official image -> the Flower CLI it runs.
FLOWER_IMAGES = {
    "flwr/superlink": "flower-superlink",
    "flwr/supernode": "flower-supernode",
    "flwr/superexec": "flower-superexec",
}
SERVICES = {
    "superlink",
    "superexec-serverapp",
    "supernode-1",
    "superexec-clientapp-1",
    "supernode-2",
    "superexec-clientapp-2",
}
SUPERLINK_PORT = "9093"
OUTPUT_ROOT = "/app/robustmerge-fl"


def _flwr_spec() -> SpecifierSet:
    """The flwr requirement of pyproject.toml, e.g. `>=1.42,<1.43`."""
    deps = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    spec = next(d for d in deps if re.match(r"flwr(\[|[<>=!~ ]|$)", d))
    return SpecifierSet(re.sub(r"^flwr(\[[^\]]*\])?", "", spec).strip())


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    result = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            result.append((keyword.upper(), rest.strip()))
    return result


def _resolve_args(value: str, instructions: list[tuple[str, str]]) -> str:
    """Substitute `${NAME}`/`$NAME` with the ARG defaults of the Dockerfile."""
    defaults = {}
    for keyword, rest in instructions:
        if keyword == "ARG" and "=" in rest:
            name, _, default = rest.partition("=")
            defaults[name] = default.strip("\"'")
    return re.sub(r"\$\{?(\w+)\}?", lambda m: defaults.get(m.group(1), m.group(0)), value)


def _load(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), f"{path} is not a YAML mapping"
    return data


def _flag_value(command: list[Any], flag: str) -> str:
    """The value after `flag` in a compose command list."""
    args = [str(a) for a in command]
    assert flag in args, f"{flag} missing in {args}"
    return args[args.index(flag) + 1]


# --- Dockerfiles ----------------------------------------------------------------------


def test_there_is_one_dockerfile_per_official_image() -> None:
    """superlink, supernode and superexec images, each on its official Flower image."""
    bases = set()
    for dockerfile in DOCKERFILES:
        instructions = _instructions(dockerfile)
        bases |= {
            _resolve_args(rest, instructions).split(":")[0]
            for kw, rest in instructions
            if kw == "FROM"
        }
    assert bases == set(FLOWER_IMAGES), bases


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_pins_the_projects_flwr_version(dockerfile: Path) -> None:
    """FROM flwr/<component>:<version> with the installed flwr, which pyproject.toml allows."""
    instructions = _instructions(dockerfile)
    froms = [_resolve_args(rest, instructions) for kw, rest in instructions if kw == "FROM"]
    assert froms, f"{dockerfile.name} has no FROM"
    for image in froms:
        repository, _, tag = image.partition(":")
        assert repository in FLOWER_IMAGES, f"{dockerfile.name}: {image} is not Flower's"
        version = tag.split("-")[0]
        assert version == flwr.__version__, (
            f"{dockerfile.name}: FROM {image} pins flwr {version}, but the project runs "
            f"flwr {flwr.__version__}; use {repository}:{flwr.__version__}"
        )
        assert Version(version) in _flwr_spec(), (
            f"{dockerfile.name}: {image} is outside pyproject's flwr{_flwr_spec()}"
        )


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_runs_flower_cli_as_non_root(dockerfile: Path) -> None:
    """The last USER is the images' `app` user; ENTRYPOINT is the base image's Flower CLI."""
    instructions = _instructions(dockerfile)
    users = [rest for kw, rest in instructions if kw == "USER"]
    assert users, f"{dockerfile.name} sets no USER"
    assert users[-1].split(":")[0] not in {"root", "0"}, f"{dockerfile.name} runs as root"
    base = _resolve_args(next(rest for kw, rest in instructions if kw == "FROM"), instructions)
    entrypoints = [rest for kw, rest in instructions if kw == "ENTRYPOINT"]
    assert entrypoints == [f'["{FLOWER_IMAGES[base.split(":")[0]]}"]'], entrypoints


def test_superexec_image_installs_cpu_torch_first_and_the_workload() -> None:
    """torch==2.13.0 from the CPU index before the rest; workload pins as in setup.sh."""
    dockerfile = DOCKER / "superexec.Dockerfile"
    instructions = _instructions(dockerfile)
    installs = [
        _resolve_args(rest, instructions)
        for kw, rest in instructions
        if kw == "RUN" and "pip install" in rest
    ]
    assert installs, "no pip install in superexec.Dockerfile"
    first = installs[0]
    assert '"torch==2.13.0"' in first, first
    assert "--index-url" in first and "download.pytorch.org/whl/cpu" in first, first
    assert any("-c " in run and "requirements.txt" in run for run in installs[1:]), (
        "the project's dependencies must be installed under a torch constraint"
    )

    setup = (REPO_ROOT / "scripts" / "setup.sh").read_text()
    setup_line = next(line for line in setup.splitlines() if "--no-deps" in line)
    setup_pins = {a for a in shlex.split(setup_line) if "==" in a}
    image_pins = {a for run in installs if "--no-deps" in run for a in run.split() if "==" in a}
    assert setup_pins and setup_pins == image_pins, (setup_pins, image_pins)

    env = " ".join(rest for kw, rest in instructions if kw == "ENV")
    assert "HF_HUB_OFFLINE=1" in env
    assert f"ROBUSTMERGE_FL_OUTPUT_ROOT={OUTPUT_ROOT}" in env


def test_superexec_build_context_sends_only_pyproject() -> None:
    """The Dockerfile-specific ignore file keeps .venv, outputs and keys out of the context."""
    lines = [
        line.strip()
        for line in (DOCKER / "superexec.Dockerfile.dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines == ["*", "!pyproject.toml"]
    copies = [rest for kw, rest in _instructions(DOCKER / "superexec.Dockerfile") if kw == "COPY"]
    assert all(rest.split()[0] == "pyproject.toml" for rest in copies), copies


# --- compose --------------------------------------------------------------------------


def test_compose_names_the_services_ports_and_volumes() -> None:
    """One SuperLink (port 9093 published, database in a volume), the ServerApp's SuperExec
    (outputs in a volume), and per site a SuperNode with a SuperExec that mounts its data
    read-only; every address points at a service and the port that service listens on."""
    data = _load(COMPOSE)
    services = data["services"]
    assert set(services) == SERVICES
    assert set(data["volumes"]) == {"superlink-state", "server-outputs"}

    link = services["superlink"]
    assert _flag_value(link["command"], "--port") == SUPERLINK_PORT
    assert _flag_value(link["command"], "--host") == "0.0.0.0"
    assert _flag_value(link["command"], "--isolation") == "process"
    assert link["ports"] == [f"{SUPERLINK_PORT}:{SUPERLINK_PORT}"]
    database = _flag_value(link["command"], "--database")
    assert f"superlink-state:{os.path.dirname(database)}" in link["volumes"]

    server = services["superexec-serverapp"]
    assert _flag_value(server["command"], "--runtime-api-address") == f"superlink:{SUPERLINK_PORT}"
    assert f"server-outputs:{OUTPUT_ROOT}" in server["volumes"]

    ports = set()
    for site in (1, 2):
        node = services[f"supernode-{site}"]
        assert _flag_value(node["command"], "--superlink") == f"superlink:{SUPERLINK_PORT}"
        assert _flag_value(node["command"], "--isolation") == "process"
        port = _flag_value(node["command"], "--port")
        ports.add(port)
        assert "ports" not in node, "a SuperNode's Runtime API must not be published"
        executor = services[f"superexec-clientapp-{site}"]
        assert _flag_value(executor["command"], "--runtime-api-address") == (
            f"supernode-{site}:{port}"
        )
        (data_mount,) = executor["volumes"]
        assert data_mount.endswith(":/app/data:ro"), data_mount
        assert f"SITE{site}_DATA" in data_mount
        assert f"SITE{site}_NODE_CONFIG" in str(node["command"])
    assert len(ports) == 2, "SuperNodes need distinct Runtime API ports"


def test_compose_images_are_built_here_and_tagged_with_the_flwr_version() -> None:
    """Every service builds one of docker/*.Dockerfile; image tags carry the flwr version."""
    names = {p.name for p in DOCKERFILES}
    for path in (COMPOSE, COMPOSE_GPU):
        for name, service in _load(path)["services"].items():
            if "build" in service:
                assert service["build"]["context"] == ".."
                assert Path(service["build"]["dockerfile"]).name in names, name
            assert service["image"].split(":")[1].startswith(flwr.__version__), name


def test_compose_tls_mounts_every_credential_read_only() -> None:
    """Each path a TLS flag names is mounted read-only from what generate.sh writes; the CA
    key is mounted nowhere; the SuperLink no longer runs --insecure; nothing else does."""
    tls = _load(COMPOSE_TLS)["services"]
    assert set(tls) == {"superlink", "superexec-serverapp", "supernode-1", "supernode-2"}
    credential_flags = {
        "--ssl-ca-certfile": "tls/ca.crt",
        "--ssl-certfile": "tls/server.pem",
        "--ssl-keyfile": "tls/server.key",
        "--superexec-auth-secret-file": "tls/superexec.secret",
        "--root-certificates": "tls/ca.crt",
        "--auth-supernode-private-key": "keys/",
    }
    for name, service in tls.items():
        command = [str(a) for a in service["command"]]
        assert "--insecure" not in command, name
        mounts = {}
        for volume in service["volumes"]:
            source, target, mode = volume.split(":")
            assert mode == "ro", f"{name}: {volume} must be read-only"
            assert source.startswith("./certs/generated/"), volume
            assert not source.endswith("ca.key"), f"{name} must not see the CA's private key"
            mounts[target] = source
        for flag, generated in credential_flags.items():
            if flag in command:
                path = _flag_value(command, flag)
                assert path in mounts, f"{name}: {flag} {path} is not mounted"
                assert generated in mounts[path], (name, flag, mounts[path])
    assert "--enable-supernode-auth" in tls["superlink"]["command"]
    for site in (1, 2):
        key = _flag_value(tls[f"supernode-{site}"]["command"], "--auth-supernode-private-key")
        assert key.endswith(f"supernode-{site}"), key


def test_compose_gpu_gives_the_server_cuda_torch_and_a_gpu() -> None:
    """Only the ServerApp's SuperExec changes: PyPI (CUDA) torch and one NVIDIA device."""
    services = _load(COMPOSE_GPU)["services"]
    assert set(services) == {"superexec-serverapp"}
    server = services["superexec-serverapp"]
    assert server["build"]["args"]["TORCH_INDEX_URL"] == "https://pypi.org/simple"
    (device,) = server["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]


# --- certificate script ---------------------------------------------------------------


def _generate(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(GENERATE_SH), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, **(env or {})},
    )


def test_generate_sh_is_valid_bash() -> None:
    """`bash -n` parses the script."""
    done = subprocess.run(["bash", "-n", str(GENERATE_SH)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("use_ssh_keygen", [True, False], ids=["ssh-keygen", "cryptography"])
def test_generate_sh_makes_what_flower_loads(tmp_path: Path, use_ssh_keygen: bool) -> None:
    """CA + server certificate (SANs, serverAuth, signed by the CA) + P-384 node key pairs."""
    env = {} if use_ssh_keygen else {"GENERATE_NO_SSH_KEYGEN": "1"}
    done = _generate(
        "all", "--out", str(tmp_path), "--san", "DNS:superlink,IP:10.1.2.3", "--names", "a b",
        env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr

    ca = x509.load_pem_x509_certificate((tmp_path / "tls" / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((tmp_path / "tls" / "server.pem").read_bytes())
    server.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "superlink"}
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {
        "127.0.0.1",
        "10.1.2.3",
    }
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    key = load_pem_private_key((tmp_path / "tls" / "server.key").read_bytes(), None)
    assert key.public_key() == server.public_key()
    secret = (tmp_path / "tls" / "superexec.secret").read_bytes()
    assert len(secret) == 64 and not secret.endswith(b"\n")

    for name in ("a", "b"):
        private = load_ssh_private_key((tmp_path / "keys" / name).read_bytes(), None)
        public = load_ssh_public_key((tmp_path / "keys" / f"{name}.pub").read_bytes())
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        assert isinstance(private.curve, ec.SECP384R1)
        assert private.public_key() == public
    for secret_file in ("tls/ca.key", "tls/server.key", "tls/superexec.secret", "keys/a"):
        mode = (tmp_path / secret_file).stat().st_mode & 0o777
        assert mode == 0o600, f"{secret_file} has mode {oct(mode)}"


def test_generate_sh_never_overwrites_without_force(tmp_path: Path) -> None:
    """A second run refuses (exit 2, files untouched); --force replaces."""
    assert _generate("all", "--out", str(tmp_path)).returncode == 0
    ca = (tmp_path / "tls" / "ca.crt").read_bytes()
    again = _generate("tls", "--out", str(tmp_path))
    assert again.returncode == 2 and "--force" in again.stderr
    assert (tmp_path / "tls" / "ca.crt").read_bytes() == ca
    assert _generate("tls", "--out", str(tmp_path), "--force").returncode == 0
    assert (tmp_path / "tls" / "ca.crt").read_bytes() != ca


def test_generate_sh_rejects_bad_arguments(tmp_path: Path) -> None:
    """Unknown commands and options, and unsafe key names, fail with a message."""
    for args in (["sign"], ["keys", "--bogus"], ["keys", "--names", "../x"]):
        done = _generate(*args, "--out", str(tmp_path)) if args[0] != "sign" else _generate(*args)
        assert done.returncode == 2, (args, done.stderr)
        assert done.stderr.startswith("generate.sh: "), done.stderr


def test_superexec_image_installs_flwrs_dp_extra() -> None:
    """The image keeps the base image's flwr, so the [dp] extra pyproject asks for (the DP
    accountant) is installed by hand, with flwr's own version range."""
    from importlib import metadata

    extra = [r.split(";")[0].strip() for r in metadata.requires("flwr") or [] if "'dp'" in r]
    assert extra, "flwr declares no [dp] extra"
    dockerfile = (DOCKER / "superexec.Dockerfile").read_text()
    for requirement in extra:
        assert f'"{requirement}"' in dockerfile, requirement
