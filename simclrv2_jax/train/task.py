"""Task: what a stage hands the shared loop -- its model, loss, data and how to start.

A stage describes only what is its own (``loss_fn``, ``model_inputs``, the data streams, extra eval
sums, the checkpoint it starts from). Everything else is made here, the same way for every stage:
the step count and the optimiser with its schedule (from the config and the number of training
examples), and the train and eval steps (from the one step factory in ``step.py``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from simclrv2_jax.train import components
from simclrv2_jax.train.state import TrainState, create_train_state
from simclrv2_jax.train.step import LossFn, image_input, make_eval_step, make_train_step


@dataclasses.dataclass
class Task:
    """What a stage gives the shared loop.

    ``train_step(state, batch, *extra) -> (state, metrics)`` and ``eval_step(state, batch, *extra)
    -> sums`` are pure and get jitted by the loop; ``extra`` holds arrays the step reads but does not
    own (the distillation teacher). ``eval_step`` returns per-batch *sums* plus ``count``; the loop
    divides the summed values by the summed ``count``. It exists when ``eval_data`` does.
    ``train_data(start_step)`` and ``eval_data()`` give iterables of host batches (tf.data datasets).
    ``initialize(state, tx)`` fills a fresh state from an earlier stage's checkpoint (the optimiser
    state restarts) and runs only when the workdir has no checkpoint to resume.
    """

    name: str
    config: ml_collections.ConfigDict
    model: Any  # a SimCLRModel
    image_shape: tuple[int, int, int]  # (H, W, C) of one model input image
    num_examples: int  # training examples in one epoch: sets the steps and the schedule
    loss_fn: LossFn
    train_data: Callable[[int], Iterable]
    model_inputs: Callable[..., tuple[jax.Array, dict]] = image_input
    augment: Callable[[dict, jax.Array], dict] | None = None  # what the step does to a train batch first
    augment_on_device: bool = False  # the whole augmentation runs in the step (else on the host)
    trainable: Callable[[Any], Any] | None = None  # params -> bool tree; False leaves are frozen
    eval_data: Callable[[], Iterable] | None = None
    eval_extra_sums: Callable[..., dict] | None = None
    eval_preprocess: Callable[[jax.Array], jax.Array] | None = None  # on-device evaluation view
    initialize: Callable[[TrainState, optax.GradientTransformation], TrainState] | None = None
    memory: Any = None  # a train.memory.MomentumMemory: pretraining's memory of negatives
    # The model outputs a loss over the whole batch reads (pretraining's projections and linear
    # head): with micro-batches its gradient is then taken exactly in two passes; empty: the loss is
    # a mean of per-example terms and the micro-batches' gradients are averaged (train/microbatches.py).
    loss_outputs: tuple[str, ...] = ()
    mesh: Any = None  # the mesh the stage was built for: micro-batches split each device's share
    extra: tuple = ()
    extra_shardings: tuple = ()
    info: dict = dataclasses.field(default_factory=dict)  # written to results.json (data sizes, ...)
    # The earlier runs this one is built from, by role ("checkpoint": the run a fresh state is
    # initialised from; "teacher": distillation's teacher) -> (path, its config field): recorded in
    # run.json when the run starts and compared with what they are now when it resumes.
    inputs: dict = dataclasses.field(default_factory=dict)
    # ``knn(gather=...) -> KnnMonitor``: the k-NN monitor the loop runs at each evaluation
    # (pretraining's, train/knn.py); ``gather`` puts fsdp-split parameters together.
    knn: Callable[..., Any] | None = None
    # What the data has to say at the end of a run (an image folder: the images skipped as bad).
    data_info: Callable[[], dict] | None = None

    total_steps: int = dataclasses.field(init=False)
    tx: optax.GradientTransformation = dataclasses.field(init=False)
    schedule: optax.Schedule = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        self.total_steps = components.total_steps(self.config, self.num_examples)
        self.tx, self.schedule = components.optimizer(
            self.config, self.num_examples, self.total_steps, trainable_mask=self.trainable
        )

    def init_state(self, seed: int) -> TrainState:
        """The state at step 0 (before any ``initialize`` from an earlier stage's checkpoint)."""
        return create_train_state(self.init_variables, self.tx, seed, memory=self.memory)

    def init_variables(self, key: jax.Array) -> dict:
        images = jnp.zeros((2, *self.image_shape), jnp.float32)
        return self.model.init(key, images, train=False)

    @functools.cached_property
    def train_step(self) -> Callable[..., tuple[TrainState, dict]]:
        return self.make_train_step()

    def make_train_step(self, layout: Any = None) -> Callable[..., tuple[TrainState, dict]]:
        """The train step with the parameters laid out by ``layout`` (``parallel.ParamLayout``)."""
        return make_train_step(
            self.model,
            self.tx,
            self.schedule,
            self.config,
            self.loss_fn,
            model_inputs=self.model_inputs,
            augment=self.augment,
            layout=layout,
            memory=self.memory,
            loss_outputs=self.loss_outputs,
            mesh=self.mesh,
        )

    @functools.cached_property
    def eval_step(self) -> Callable[..., dict] | None:
        return self.make_eval_step()

    def make_eval_step(self, layout: Any = None) -> Callable[..., dict] | None:
        if self.eval_data is None:
            return None
        return make_eval_step(self.model, self.eval_extra_sums, self.eval_preprocess, layout=layout)
