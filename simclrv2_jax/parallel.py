"""Device mesh, shardings and multi-host start-up.

One mesh axis, ``data``: the global batch is split over every device of every host, parameters and
optimiser state are replicated. Because the train step is ``jax.jit`` over *global* arrays, global
batch norm and the all-device NT-Xent negatives need no explicit collectives: XLA inserts them.
The mesh uses ``Auto`` axis types so that XLA's sharding propagation places intermediates.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def initialize_distributed() -> None:
    """Joins a multi-host job when the environment describes one (TPU pod, SLURM, explicit env).

    ``jax.distributed.initialize()`` discovers TPU pod slices and SLURM jobs by itself; for other
    clusters set ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``.
    ``SIMCLR_DISTRIBUTED=1`` forces the call (``launch/tpu.sh`` sets it on pod slices). On CPU,
    several processes on one machine need ``jax_cpu_collectives_implementation='gloo'``.
    """
    if jax.distributed.is_initialized():
        return
    explicit = "JAX_COORDINATOR_ADDRESS" in os.environ
    on_cluster = (
        explicit
        or os.environ.get("SIMCLR_DISTRIBUTED") == "1"
        or "TPU_WORKER_HOSTNAMES" in os.environ
        or "SLURM_JOB_ID" in os.environ
    )
    if not on_cluster:
        return
    if explicit and os.environ.get("JAX_PLATFORMS", "") == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs: dict[str, Any] = {}
    if explicit:
        kwargs = dict(
            coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
        )
    jax.distributed.initialize(**kwargs)
    logging.info(
        "Joined a job of %d processes as process %d; %d devices in all.",
        jax.process_count(),
        jax.process_index(),
        jax.device_count(),
    )


def create_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D ``data`` mesh over all devices (or the first ``num_devices``)."""
    devices = jax.devices()
    if num_devices is not None:
        if not 1 <= num_devices <= len(devices):
            raise ValueError(f"num_devices={num_devices} but {len(devices)} device(s) are available.")
        devices = devices[:num_devices]
    return Mesh(np.asarray(devices), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


def data_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over ``data``."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def local_batch_size(global_batch_size: int, mesh: Mesh, field: str = "train_batch_size") -> int:
    """This process's share of a global batch; a clear error when it does not split evenly."""
    devices = mesh.devices.size
    if global_batch_size % devices:
        lower = max(devices, global_batch_size // devices * devices)
        raise ValueError(
            f"{field}={global_batch_size} does not divide evenly over {devices} devices. "
            f"Use a multiple of {devices}, e.g. --config.{field}={lower} or {lower + devices}."
        )
    return global_batch_size // jax.process_count()


def group_major(parts, groups: int):
    """Stacks equal-size batches (e.g. the two views) so that each of ``groups`` consecutive slices
    holds its share of every part: ``[p0[g0], p1[g0], p0[g1], p1[g1], ...]``.

    With the batch sharded over ``groups`` devices, a slice is one device's examples with all their
    parts: the batch-norm group of per-device BN (``global_bn=False``), as each replica of the
    release normalises its own images' two views together. ``groups <= 1`` concatenates the parts.
    """
    import jax.numpy as jnp

    if groups <= 1:
        return jnp.concatenate(parts, axis=0)
    stacked = jnp.stack(parts)  # [P, N, ...]
    p, n = stacked.shape[:2]
    if n % groups:
        raise ValueError(f"A batch of {n} rows cannot be split into {groups} batch-norm groups.")
    rest = stacked.shape[2:]
    grouped = stacked.reshape((p, groups, n // groups) + rest).swapaxes(0, 1)
    return grouped.reshape((p * n,) + rest)


def part_major(x, num_parts: int, groups: int):
    """The inverse of ``group_major``: the parts one after another, ``[p0; p1; ...]``."""
    if groups <= 1:
        return x
    n = x.shape[0] // num_parts
    rest = x.shape[1:]
    return x.reshape((groups, num_parts, n // groups) + rest).swapaxes(0, 1).reshape(x.shape)
