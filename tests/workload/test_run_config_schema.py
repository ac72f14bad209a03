"""The run-config schema is the one home of every default: it must match pyproject.toml exactly,
and its reader must refuse what both apps refuse, in one wording."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from workload.config import SCHEMA, ConfigError, Reader

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def project_defaults() -> dict[str, object]:
    with PYPROJECT.open("rb") as handle:
        config: dict[str, object] = tomllib.load(handle)["tool"]["flwr"]["app"]["config"]
    return config


def test_schema_matches_pyproject_keys_and_values() -> None:
    defaults = project_defaults()
    assert set(SCHEMA) == set(defaults)
    for key, setting in SCHEMA.items():
        value = defaults[key]
        assert (type(setting.default), setting.default) == (type(value), value), key


def test_every_schema_default_passes_its_own_checks() -> None:
    reader = Reader({})
    for key, setting in SCHEMA.items():
        if setting.kind == "choice" and setting.choices is None:
            continue  # a registry above this module supplies the choices
        read = getattr(reader, setting.kind)
        read(key)


def test_an_integer_setting_refuses_a_float_even_an_integral_one() -> None:
    with pytest.raises(
        ConfigError, match=r"run config key 'seed' must be an integer >= 0; got 3\.0 \(float\)"
    ):
        Reader({"seed": 3.0}).integer("seed")
    assert Reader({"seed": 3}).integer("seed") == 3


def test_errors_name_the_source() -> None:
    with pytest.raises(ConfigError, match=r"node config key 'partition-id' must be an integer"):
        Reader({"partition-id": "a"}, "node config").integer("partition-id", 0, low=0)


@pytest.mark.parametrize(
    ("value", "expected"),
    [("", ()), ("4,8,16", (4, 8, 16)), (" 4, 4 ,1024", (4, 4, 1024)), ("8", (8,))],
)
def test_client_ranks_reads_positive_ranks_in_order(value: str, expected: tuple[int, ...]) -> None:
    assert Reader({"client-ranks": value}).ranks("client-ranks") == expected


@pytest.mark.parametrize("value", ["0", "4,-8", "4,,8", "4.0", "a", "4,1025", 8, True])
def test_client_ranks_refuses_non_ranks_naming_the_key(value: object) -> None:
    with pytest.raises(
        ConfigError,
        match=r"run config key 'client-ranks' must be a comma-separated list of ranks, each an "
        r"integer in \[1, 1024\]",
    ):
        Reader({"client-ranks": value}).ranks("client-ranks")
