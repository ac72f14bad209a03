"""Check a run's ``-c``/``--run-config`` overrides before Flower is called.

``scripts/run_simulation.sh`` runs ``python -m server.run_config_check <its flwr run arguments>``
first. Flower's own ``flwr run`` refuses an unknown key only with "[code: 15] Invalid run
configuration." (no key named), and a bad value only once the ServerApp has started, under a
traceback. Here both are refused in one line, before anything starts:

- every override key must be a key of the app's ``[tool.flwr.app.config]`` (``workload.config
  .SCHEMA``, which a test keeps equal to pyproject.toml); an unknown one is named with the
  closest known key ("did you mean 'server-lr'?");
- every override value is read by the schema's ``Reader`` (the same check, and message, the
  ServerApp and ClientApp give), and the whole run config, defaults plus overrides, goes through
  ``ServerSettings.from_run_config``, the ServerApp's own start-up read (ranges, choices from the
  registries, settings that do not combine).

The overrides are parsed by Flower's ``parse_config_args`` and merged with the app's defaults by
``get_fused_config_from_dir``, exactly as ``flwr run`` and the simulation do. Checks that need the
model or data (a task kind's own checks) stay with the ServerApp; the wrapper reports the run's
final status when one fails.

Exit status: 0 accepted, 2 refused (one line on stderr: ``run_simulation.sh: error: ...``).
"""

from __future__ import annotations

import difflib
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from click import ClickException
from flwr.common.config import get_fused_config_from_dir, parse_config_args

from server.config import ServerSettings
from workload.config import SCHEMA, ConfigError, Reader

APP_DIR = Path(__file__).resolve().parents[1]
PROG = "run_simulation.sh"
RUN_CONFIG_FLAGS = ("-c", "--run-config")

EXIT_OK = 0
EXIT_REFUSED = 2


def run_config_arguments(argv: Sequence[str]) -> list[str]:
    """The values of every ``-c``/``--run-config`` in ``flwr run`` arguments, in order.

    Accepts the spellings click does: ``-c V``, ``-cV``, ``--run-config V``,
    ``--run-config=V``; a flag without a value is left for ``flwr run`` to refuse.
    """
    values: list[str] = []
    items = iter(argv)
    for item in items:
        if item in RUN_CONFIG_FLAGS:
            value = next(items, None)
            if value is not None:
                values.append(value)
        elif item.startswith("--run-config="):
            values.append(item.split("=", 1)[1])
        elif item.startswith("-c") and not item.startswith("--") and len(item) > 2:
            values.append(item[2:])
    return values


def unknown_key_refusal(keys: Iterable[str], known: Iterable[str]) -> str | None:
    """One line naming the first unknown key and the closest known one, or None if all known."""
    known_keys = sorted(known)
    for key in keys:
        if key in known_keys:
            continue
        close = difflib.get_close_matches(key.replace("_", "-"), known_keys, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}?" if close else "see docs/run-config.md for the keys"
        return f"run config key {key!r} is not a setting of this app; {hint}"
    return None


def check_overrides(overrides: Mapping[str, Any], app_dir: Path = APP_DIR) -> None:
    """Refuse unknown keys and bad values of ``overrides`` (flat, as Flower parses ``-c``).

    Raises
    ------
    ConfigError
        Naming the key, what is allowed and what came (the wording of ``workload.config``).
    """
    refusal = unknown_key_refusal(overrides, SCHEMA)
    if refusal is not None:
        raise ConfigError(refusal)
    run_config = get_fused_config_from_dir(app_dir, dict(overrides))
    reader = Reader(run_config)
    for key in overrides:
        setting = SCHEMA[key]
        if setting.kind == "choice" and setting.choices is None:
            continue  # a registry above the schema names the choices; the ServerApp read has them
        getattr(reader, setting.kind)(key)  # the schema's kinds are the Reader's method names
    ServerSettings.from_run_config(run_config)


def main(argv: Sequence[str] | None = None) -> int:
    """Check the ``flwr run`` arguments ``argv`` (``sys.argv[1:]`` when None); 0 or 2."""
    arguments = run_config_arguments(list(sys.argv[1:] if argv is None else argv))
    try:
        check_overrides(parse_config_args(arguments or None))
    except ClickException as error:  # Flower's refusal of a malformed -c string
        return _refuse(error.format_message())
    except (ValueError, OSError) as error:  # ConfigError is a ValueError
        return _refuse(str(error))
    return EXIT_OK


def _refuse(message: str) -> int:
    line = " ".join(message.split())
    print(f"{PROG}: error: {line}", file=sys.stderr, flush=True)
    return EXIT_REFUSED


if __name__ == "__main__":
    raise SystemExit(main())
