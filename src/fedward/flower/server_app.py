"""The Flower ServerApp: reads the fedward config from the run config and runs the
:class:`fedward.flower.server.Coordinator` round loop."""

from __future__ import annotations

import sys

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedward.engine.simulation import print_summary
from fedward.errors import FedwardError
from fedward.flower.server import Coordinator, ServerSettings, read_config

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    try:
        cfg = read_config(dict(context.run_config))
        settings = ServerSettings.from_run_config(dict(context.run_config), cfg)
        coordinator = Coordinator(grid, cfg, settings)
        summary = coordinator.run()
    except FedwardError as err:
        print(f"fedward: error: {err}", file=sys.stderr, flush=True)
        raise
    print_summary(summary, coordinator.run_dir)
