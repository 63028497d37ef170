"""fedward on Flower: the same methods across machines (one SuperLink, one SuperNode per hospital).

Layout by role:
- ``client_app`` / ``server_app``: the Flower ClientApp and ServerApp (thin: they translate
  Flower messages to fedward's and back).
- ``node``: what a SuperNode does for its hospital: load its own data only, run the method's
  ``client_update``, keep the client's state in a folder on the node.
- ``server``: the round loop on the server: handshake, broadcast, reply checks, dropout
  handling, aggregation with the method's ``aggregate``, run directory and checkpoints.
- ``records``: fedward messages <-> Flower records; ``checks``: reply validation.
- ``tls`` (development certificates), ``launch`` (``fedward flower ...`` wrappers) and ``app``
  (the generated Flower App folder).

No algorithm code lives here: every method's work is its ``client_update`` and ``aggregate``,
exactly as in the in-process simulation.
"""

from __future__ import annotations

from fedward.errors import ConfigError

FLWR_VERSION = "1.41.0"
DEFAULT_PORT = 9093  # the SuperLink's one HTTP port (Fleet, Control and Runtime APIs in flwr 1.41)
DEFAULT_NODE_PORT = 9094  # a SuperNode's ClientAppIo port: nodes on one machine need distinct ones


def require_flwr() -> None:
    """Fail with the install command when Flower is missing."""
    try:
        import flwr  # noqa: F401
    except ImportError:
        raise ConfigError(f'Flower is not installed: pip install "fedward[flower]" (flwr=={FLWR_VERSION})') from None
