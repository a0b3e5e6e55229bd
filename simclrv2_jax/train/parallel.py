"""Device mesh, shardings and multi-host start-up.

One mesh axis, ``data``: the global batch is split over every device of every host. Because the
train step is ``jax.jit`` over *global* arrays, global batch norm and the all-device NT-Xent
negatives need no explicit collectives: XLA inserts them. The mesh uses ``Auto`` axis types so that
XLA's sharding propagation places intermediates.

Parameters and optimiser state are laid out by ``param_sharding``:

* ``replicated``: every device holds all of them (the default; fastest while they fit).
* ``fsdp``: every parameter with at least ``fsdp_min_size`` elements, and each optimiser slot of the
  same shape, is split over the ``data`` axis along its largest dimension that the device count
  divides; BN statistics, the step, the RNG and small vectors stay replicated. The train step
  gathers the parameters where it uses them (``ParamLayout.gather``) and hands the gradients back
  in the split layout (``ParamLayout.scatter``), so XLA reduce-scatters them instead of
  all-reducing, and the optimiser updates only each device's slice. Results equal the replicated
  layout's to float rounding; checkpoints restore into either layout and any device count.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from simclrv2_jax.config import flag
from simclrv2_jax.config.fields import PARAM_SHARDINGS
from simclrv2_jax.models import block_stack
from simclrv2_jax.models.block_stack import is_stacked_path

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
            f"Use a multiple of {devices}, e.g. {flag(field)}={lower} or {lower + devices}."
        )
    return global_batch_size // jax.process_count()


def input_shards(config) -> int:
    """How many disjoint shards the training data is read in (``config.input_shards``; 0: one per
    process). The global batch is the shards' batches one after another, each shard with its own
    order and augmentation draws, so the data a run sees depends on the shard count alone: a run on
    fewer processes with ``input_shards`` set to the old process count sees exactly the same batches
    (e.g. a pod run resumed on a smaller slice)."""
    processes = jax.process_count()
    shards = int(config.get("input_shards", 0)) or processes
    if shards % processes or config.train_batch_size % shards:
        raise ValueError(
            f"config.input_shards={shards} must be a multiple of the {processes} process(es) and divide "
            f"train_batch_size={config.train_batch_size}. Use e.g. {flag('input_shards')}={processes}, "
            "or 0 for one shard per process."
        )
    return shards


def process_input_shards(shards: int) -> range:
    """The input shards this process reads: a consecutive run, so that its local batch is where its
    devices sit in the global batch."""
    per_process = shards // jax.process_count()
    return range(jax.process_index() * per_process, (jax.process_index() + 1) * per_process)


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


def fsdp_spec(shape: tuple[int, ...], devices: int, min_size: int, stacked: bool = False) -> PartitionSpec:
    """Where an array of ``shape`` is split under fsdp: its largest dimension that ``devices``
    divides (the first such among equals), or nowhere when it is small or nothing divides.

    ``stacked``: the leading axis indexes scanned blocks (``scan_blocks``): it is never split (the
    loop takes one row per step), and the size rule applies to one row, as for an unrolled block.
    """
    first = 1 if stacked and len(shape) > 1 else 0
    size = int(np.prod(shape[first:])) if shape else 1
    if devices <= 1 or size < min_size:
        return PartitionSpec()
    dims = [d for d in range(first, len(shape)) if shape[d] % devices == 0]
    if not dims:
        return PartitionSpec()
    dim = max(dims, key=lambda d: (shape[d], -d))
    return PartitionSpec(*([None] * dim + [DATA_AXIS]))


class ParamLayout:
    """Where the parameters live between steps, and how the step gathers and scatters them.

    ``shardings(tree)`` gives the sharding of every leaf of a parameter-shaped tree (parameters,
    gradients, optimiser slots); ``gather``/``scatter`` are identities for ``replicated``.
    """

    def __init__(self, mesh: Mesh, mode: str = "replicated", min_size: int = 2**14):
        if mode not in PARAM_SHARDINGS:
            raise ValueError(f"param_sharding={mode!r}: use one of {', '.join(PARAM_SHARDINGS)}.")
        self.mesh, self.mode, self.min_size = mesh, mode, int(min_size)

    @property
    def sharded(self) -> bool:
        return self.mode == "fsdp" and self.mesh.shape[DATA_AXIS] > 1

    def sharding(self, shape: tuple[int, ...], stacked: bool = False) -> NamedSharding:
        if not self.sharded:
            return replicated(self.mesh)
        spec = fsdp_spec(tuple(shape), self.mesh.shape[DATA_AXIS], self.min_size, stacked)
        return NamedSharding(self.mesh, spec)

    def shardings(self, tree: Any) -> Any:
        return jax.tree_util.tree_map_with_path(
            lambda path, a: self.sharding(a.shape, is_stacked_path(path)), tree
        )

    def state_shardings(self, abstract_state: Any) -> Any:
        """Shardings of a ``TrainState``: ``params``, ``opt_state`` and the memory network's weights
        (``memory["params"]``, pretraining with memory) laid out, the rest replicated."""
        rep = replicated(self.mesh)
        everything = jax.tree_util.tree_map(lambda _: rep, abstract_state)
        laid_out = dict(
            params=self.shardings(abstract_state.params), opt_state=self.shardings(abstract_state.opt_state)
        )
        memory = getattr(abstract_state, "memory", None)
        if memory is not None:
            laid_out["memory"] = {**everything.memory, "params": self.shardings(memory["params"])}
        return everything.replace(**laid_out)

    def gather(self, params: Any, keep_stacked: bool = False) -> Any:
        """The whole parameters, on every device (inside a jitted step).

        ``keep_stacked``: leave the scanned blocks' stacked weights split; the model gathers them one
        block per loop step (``gather_rows``), so only one block's weights are whole at a time.
        """
        if not self.sharded:
            return params
        rep = replicated(self.mesh)

        def gather_one(path, p):
            if keep_stacked and is_stacked_path(path):
                return p
            return jax.lax.with_sharding_constraint(p, rep)

        return jax.tree_util.tree_map_with_path(gather_one, params)

    def gather_rows(self, tree: Any) -> Any:
        """One scanned block's weights (rows of the stacks) made whole inside the loop; in the
        backward pass their gradients are reduce-scattered back to the rows' split, in the loop too."""
        if not self.sharded:
            return tree
        rep = replicated(self.mesh)

        def gather_one(p):
            split = self.sharding(p.shape)

            @jax.custom_vjp
            def whole(x):
                return jax.lax.with_sharding_constraint(x, rep)

            def forward(x):
                return whole(x), None

            def backward(_, g):
                # Summed over the devices' examples, then split: a reduce-scatter (see ``scatter``).
                return (jax.lax.with_sharding_constraint(jax.lax.with_sharding_constraint(g, rep), split),)

            whole.defvjp(forward, backward)
            return whole(p)

        return jax.tree_util.tree_map(gather_one, tree)

    def for_apply(self, model: Any, params: Any) -> tuple[Any, Any]:
        """``(model, params)`` to apply inside a jitted step: the parameters gathered (``gather``),
        except that a model with scanned blocks gathers their weights block by block itself."""
        if self.sharded and hasattr(model, "gather_blocks") and block_stack.is_stacked(params):
            return model.clone(gather_blocks=self.gather_rows), self.gather(params, keep_stacked=True)
        return model, self.gather(params)

    def scatter(self, grads: Any) -> Any:
        """Gradients in the parameters' layout: each device keeps the sum over the batch of its slice."""
        if not self.sharded:
            return grads
        rep = replicated(self.mesh)

        def scatter_one(path, g):
            if is_stacked_path(path):  # already reduce-scattered row by row in the loop (gather_rows)
                return jax.lax.with_sharding_constraint(g, self.sharding(g.shape, True))
            # First whole (each device's partial sum over its examples, summed over devices), then
            # split: XLA turns the pair into a reduce-scatter. Constrained straight to the split
            # layout, sharding propagation computes the weight gradient split by output channel
            # instead, all-gathering the activations of the whole global batch onto every device.
            whole = jax.lax.with_sharding_constraint(g, rep)
            return jax.lax.with_sharding_constraint(whole, self.sharding(g.shape))

        return jax.tree_util.tree_map_with_path(scatter_one, grads)

    def bytes_per_device(self, tree: Any) -> int:
        """Bytes one device holds of ``tree`` (abstract or concrete arrays) in this layout."""
        total = 0
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
            shard = self.sharding(leaf.shape, is_stacked_path(path)).shard_shape(tuple(leaf.shape))
            total += int(np.prod(shard)) * np.dtype(leaf.dtype).itemsize
        return total
