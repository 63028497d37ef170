"""Who runs the client updates of a round: the main process (one device) or a pool of worker
processes, one per listed device (``--devices cpu,cpu`` or ``--gpu 0,1``)."""

from __future__ import annotations

import multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from tqdm.auto import tqdm

from fedward.config import RunConfig
from fedward.data.types import FederatedData

if TYPE_CHECKING:
    from fedward.engine.simulation import ClientResult, ClientTask, Simulation


class SequentialExecutor:
    """Clients one after another in this process, sharing one workspace (one model in memory)."""

    def __init__(self, sim: "Simulation"):
        self.sim = sim

    def run(self, tasks: Iterable["ClientTask"], count: int, *, evaluate_local: bool, progress: bool,
            on_result: Callable[["ClientResult"], "ClientResult"]) -> list["ClientResult"]:
        """Each task as it comes from ``tasks`` (so only one client's state is read at a time);
        ``on_result`` takes each result when its client is done and gives what to keep of it."""
        bar = tqdm(tasks, total=count, desc="clients", unit="client", leave=False, disable=not progress or count < 2,
                   dynamic_ncols=True)
        return [on_result(self.sim.run_client(task, evaluate_local)) for task in bar]

    def close(self) -> None:
        pass


# -- pool workers ------------------------------------------------------------------------------
_WORKER_SIM = None


def _init_worker(settings: dict, data: FederatedData, device: str, threads: int) -> None:
    import torch

    from fedward.config import build_config
    from fedward.engine.simulation import Simulation

    global _WORKER_SIM
    torch.set_num_threads(threads)
    # The settings travel as a dict and are rebuilt here, so the run's plugins are imported first.
    _WORKER_SIM = Simulation(build_config(settings), data, device)


def _run_in_worker(task: "ClientTask", evaluate_local: bool) -> "ClientResult":
    return _WORKER_SIM.run_client(task, evaluate_local)


class PoolExecutor:
    """One single-process pool per device; client k goes to device k mod D, so a client's work
    always lands on the same kind of device. The data set is sent to each worker once."""

    def __init__(self, cfg: RunConfig, data: FederatedData, devices: list[str], threads: int):
        context = mp.get_context("spawn")
        self.pools = [ProcessPoolExecutor(max_workers=1, mp_context=context, initializer=_init_worker,
                                          initargs=(cfg.to_dict(), data, device, threads)) for device in devices]

    def run(self, tasks: Iterable["ClientTask"], count: int, *, evaluate_local: bool, progress: bool,
            on_result: Callable[["ClientResult"], "ClientResult"]) -> list["ClientResult"]:
        """Every task submitted at once (the round's states travel to the workers), the results
        taken in order."""
        futures = [self.pools[i % len(self.pools)].submit(_run_in_worker, task, evaluate_local)
                   for i, task in enumerate(tasks)]
        bar = tqdm(total=count, desc="clients", unit="client", leave=False, disable=not progress,
                   dynamic_ncols=True)
        results = []
        for future in futures:
            results.append(on_result(future.result()))
            bar.update(1)
        bar.close()
        return results

    def close(self) -> None:
        for pool in self.pools:
            pool.shutdown(wait=True, cancel_futures=True)


def make_executor(cfg: RunConfig, data: FederatedData, devices: list[str], sim: "Simulation"):
    if len(devices) == 1:
        return SequentialExecutor(sim)
    from fedward.engine.setup import configure_threads

    threads = configure_threads(len(devices), cfg.threads) if all(d == "cpu" for d in devices) else 1
    return PoolExecutor(cfg, data, devices, threads)
