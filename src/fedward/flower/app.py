"""The Flower App folder: a ``pyproject.toml`` whose components are fedward's ClientApp and
ServerApp. The code is the installed ``fedward`` package (every machine has it: Flower's runtime
dependency installation stays off), so the folder holds nothing else and nothing is duplicated.
``fedward flower app DIR`` writes it; ``fedward flower run`` writes one for each run it submits.
"""

from __future__ import annotations

from pathlib import Path

from fedward import __version__

# Keys of [tool.flwr.app.config]: Flower only accepts run-config overrides of keys listed here.
RUN_CONFIG_DEFAULTS = {
    "fedward-config": "",  # the resolved fedward RunConfig, as JSON (written by `fedward flower run`)
    "run-dir": "",  # the server-side run directory (default: the config's `output`)
    "resume": False,  # continue run-dir from its last checkpoint
    "min-clients": 0,  # fewest usable replies a round may aggregate (0: all clients)
    "round-timeout": 600.0,  # seconds a round waits for replies
    "join-timeout": 300.0,  # seconds the server waits for clients to connect
    "drill-bad-reply": "",  # CLIENT:ROUND:nan|inf|shape: a fire drill for the server's reply checks
}


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def pyproject_text() -> str:
    config = "\n".join(f"{key} = {_toml_value(value)}" for key, value in RUN_CONFIG_DEFAULTS.items())
    return f'''[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "fedward-flower-app"
version = "{__version__}"
description = "fedward's federated methods as a Flower App (the code is the installed fedward package)"
license = "Apache-2.0"
dependencies = ["fedward=={__version__}"]

[tool.flwr.app]
publisher = "fedward"

[tool.flwr.app.components]
serverapp = "fedward.flower.server_app:app"
clientapp = "fedward.flower.client_app:app"

[tool.flwr.app.config]
{config}
'''


def write_app(folder: str | Path) -> Path:
    """Write the App folder (``pyproject.toml`` and a README) and return it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(pyproject_text())
    (folder / "README.md").write_text("fedward on Flower: `fedward flower run --config FILE` submits runs of this App.\n")
    return folder
