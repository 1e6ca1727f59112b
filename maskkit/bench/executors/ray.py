"""``--executor ray``: each cell a Ray actor on a running cluster (``maskkit[ray]``).

The actor (:class:`~maskkit.bench.executors.jobs.CellActor`) runs the cell's attempt as the local
pool runs it, and holds ``gpus_per_cell`` GPUs (default: ``--nproc``, else 1, where the cluster
has GPUs; none where it has not) and ``threads × nproc`` CPUs while it does: Ray queues the cells
the cluster has no room for. The nodes must see the output dir and the data at the same paths
(a shared filesystem), with maskkit installed.

``--ray-address`` is ``ray.init``'s address: ``auto`` (the cluster ``ray start`` made on this
machine), ``HOST:PORT`` of a head node, ``ray://HOST:10001`` (Ray Client), or nothing: Ray's
default (``RAY_ADDRESS``, else a new Ray instance on this machine for the bench's life). A bench
that already runs inside ``ray.init`` (a test, a notebook) uses that.

The actors belong to the bench: when it stops (Ctrl-C, SIGTERM) it asks each to stop its cell
cleanly (``maskkit train`` keeps its checkpoints), records them as stopped, and the next run
resumes them. An actor that dies (its node died, it was killed) is recorded with Ray's reason.
"""

from __future__ import annotations

import logging
import socket
import time
import uuid
from typing import Any

from rich.console import Console

from maskkit.errors import ConfigError

from ..attempt import STOP_GRACE_S
from ..cells import Cell
from . import ExecutorContext, missing_extra
from .jobs import CellActor
from .remote import Ended, Handle, RemotePoolExecutor, first_line, lost, resumes
from .settings import RaySettings

#: The most torch threads per process by default (fewer where the largest node has fewer CPUs).
DEFAULT_THREADS = 4
#: Seconds to wait for a TCP connection to the cluster before calling it unreachable.
CONNECT_TIMEOUT_S = 5.0
#: The Ray namespace of the actors.
NAMESPACE = "maskkit-bench"
#: Addresses ``ray.init`` resolves itself (no host to try first).
SYMBOLIC_ADDRESSES = ("auto", "local")


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise missing_extra("ray", "ray") from None
    return ray


def check_reachable(address: str) -> None:
    """A ``HOST:PORT`` (or ``ray://HOST:PORT``) address that accepts no TCP connection is a
    :class:`~maskkit.errors.ConfigError` at once (``ray.init`` would retry for minutes)."""
    if address in SYMBOLIC_ADDRESSES:
        return
    bare = address.removeprefix("ray://")
    host, colon, port = bare.rpartition(":")
    if not colon or not host or not port.isdigit():
        raise ConfigError(f"--ray-address {address}: expected HOST:PORT, ray://HOST:PORT, auto or local")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as error:
        raise ConfigError(
            f"cannot reach the Ray cluster at {address} ({error.strerror or error}): start it "
            "(ray start --head), or check --ray-address"
        ) from None


def connect(ray: Any, address: str | None) -> None:
    """Join the cluster at ``address`` (None: Ray's default); a failure is one ConfigError."""
    if ray.is_initialized():
        return
    if address is not None:
        check_reachable(address)
    try:
        ray.init(
            address=address,
            namespace=NAMESPACE,
            log_to_driver=False,
            logging_level=logging.WARNING,
            include_dashboard=False if address in (None, "local") else None,
        )
    except (ConnectionError, RuntimeError, ValueError) as error:
        where = f"at {address}" if address else "(Ray's default address)"
        raise ConfigError(f"cannot join the Ray cluster {where}: {first_line(error)}") from None


class RayBackend:
    """Runs each cell as a :class:`CellActor` on the cluster."""

    name = "ray"
    noun = "Ray actor"

    def __init__(self, ray: Any, cpus: int, gpus: int, console: Console) -> None:
        self.ray, self.cpus, self.gpus, self.console = ray, cpus, gpus, console
        self.actor_class = ray.remote(CellActor)

    def submit(self, cell: Cell, task: Any) -> Handle:
        name = f"{cell.slug}-{uuid.uuid4().hex[:8]}"
        actor = self.actor_class.options(
            name=name, num_cpus=self.cpus, num_gpus=self.gpus, max_concurrency=2
        ).remote()
        reference = actor.run.remote(task)
        return Handle(cell, name, time.time(), resumes(cell), (actor, reference))

    def attached(self, cells: list[Cell]) -> list[Handle]:
        return []  # the actors of an earlier bench ended with it

    def poll(self, handle: Handle) -> Ended | None:
        _, reference = handle.native
        ready, _ = self.ray.wait([reference], timeout=0)
        return self._end(handle) if ready else None

    def _end(self, handle: Handle) -> Ended:
        _, reference = handle.native
        exceptions = self.ray.exceptions
        try:
            return Ended(self.ray.get(reference))
        except exceptions.RayActorError as error:  # the actor's process or node died
            return lost(handle, f"Ray actor {handle.job_id} died: {first_line(error)}")
        except exceptions.RayTaskError as error:  # the attempt itself raised
            return lost(handle, f"Ray actor {handle.job_id} failed: {first_line(error)}", interrupted=False)
        except exceptions.RayError as error:
            return lost(handle, f"Ray actor {handle.job_id}: {first_line(error)}")

    def release(self, handle: Handle) -> None:
        actor, _ = handle.native
        self.ray.kill(actor)

    def stop(self, handles: list[Handle]) -> list[tuple[Handle, Ended]]:
        """Ask every running actor to stop its cell, wait for them (up to the grace period),
        then end the actors."""
        if not handles:
            return []
        self.console.print(f"stopping {len(handles)} running cell(s) ...")
        for handle in handles:
            actor, _ = handle.native
            actor.stop.remote("the bench was stopped")
        references = [handle.native[1] for handle in handles]
        ready, _ = self.ray.wait(references, num_returns=len(references), timeout=STOP_GRACE_S + 10)
        ended = [(handle, self._end(handle)) for handle in handles if handle.native[1] in ready]
        for handle in handles:
            self.ray.kill(handle.native[0])
        return ended


class RayExecutor(RemotePoolExecutor):
    """Cells as Ray actors (:class:`RayBackend`) through :class:`~.remote.RemotePool`."""

    name = "ray"

    def __init__(
        self,
        backend: RayBackend,
        address: str | None,
        threads: int,
        nproc: int | None,
        workers: int | None,
        console: Console,
    ) -> None:
        self.backend, self.address, self.threads, self.nproc = backend, address, threads, nproc
        self.workers, self.console = workers, console

    def describe(self) -> str:
        processes = f", {self.nproc} process(es) each" if self.nproc else ""
        return (
            f"Ray ({self.address or 'default address'}), {self.backend.gpus} GPU(s) and "
            f"{self.backend.cpus} CPU(s) per cell, {self.threads} thread(s){processes}"
        )

    def start_fields(self) -> dict[str, Any]:
        return {
            "executor": self.name,
            "address": self.address,
            "gpus_per_cell": self.backend.gpus,
            "cpus_per_cell": self.backend.cpus,
            "threads": self.threads,
            "workers": self.workers,
        }


def create(context: ExecutorContext) -> RayExecutor:
    """Join the cluster (``--ray-address`` over the suite's ``ray.address``) and size a cell:
    GPUs from the options or the cluster, CPUs from the threads and processes."""
    ray = _ray()
    options = context.options
    settings = context.suite.ray or RaySettings()
    address = options.ray_address or settings.address
    connect(ray, address)
    nodes = [node for node in ray.nodes() if node.get("Alive")]
    largest_cpus = max((int(node["Resources"].get("CPU", 0)) for node in nodes), default=0)
    cluster_gpus = sum(node["Resources"].get("GPU", 0) for node in nodes)
    nproc = options.nproc or settings.nproc
    processes = nproc or 1
    gpus = options.gpus_per_cell if options.gpus_per_cell is not None else settings.gpus_per_cell
    if gpus is None:
        gpus = processes if cluster_gpus else 0
    if gpus and not cluster_gpus:
        raise ConfigError(
            f"--gpus-per-cell {gpus}: the Ray cluster has no GPUs; give --gpus-per-cell 0 to run the "
            "cells on its CPUs"
        )
    threads = context.threads or max(1, min(DEFAULT_THREADS, largest_cpus // processes))
    cpus = threads * processes
    if cpus > largest_cpus:
        raise ConfigError(
            f"a cell needs {cpus} CPUs ({threads} thread(s) × {processes} process(es)) and the largest "
            f"node of the Ray cluster has {largest_cpus}; give fewer --threads"
        )
    backend = RayBackend(ray, cpus, gpus, context.console)
    return RayExecutor(backend, address, threads, nproc, context.workers, context.console)
