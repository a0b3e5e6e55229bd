"""A run's checkpoints evaluated on an eval split: the library behind ``python -m simclrv2_jax.evaluate``.

Any workdir with checkpoints works as it is: a pretraining run (its linear-evaluation head), a
fine-tuning or distillation run, or a converted release checkpoint. The model is built from the
config saved beside each checkpoint (``SavedRun``), and only its weights and BN statistics are read
(never the optimiser state), so a run still training can be evaluated alongside.

* ``evaluate_run(workdir)``: the latest checkpoint (``step=N``: that one), or with
  ``every_checkpoint`` every finished checkpoint in step order, then each new one as the training run
  saves it (the release's ``mode=eval``), until the run has finished and its last checkpoint is
  evaluated, or no run holds the workdir and nothing new appeared for ``timeout_s``. Checkpoints
  already in ``eval_results.json`` (same data and image size) are not evaluated again, so a stopped
  evaluator goes on where it was.
* The data may differ from the run's: the fields in ``EVAL_FIELDS``. Another data set brings its own
  evaluation split (its preset's) unless the split is given too.
* Results: top-1, top-5 and the cross-entropy loss of the supervised head over the whole split, in
  ``OUTPUT/eval_results.json`` (``latest`` and every evaluation under ``results``) and TensorBoard
  (``OUTPUT/eval_<split>/``, tags ``eval/top1``, ``eval/top5``, ``eval/loss``, at the checkpoint's
  step); ``OUTPUT`` is ``output_dir``, by default the workdir.
"""

from __future__ import annotations

import collections
import json
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import ml_collections
from absl import logging
from etils import epath

from simclrv2_jax import config as config_lib
from simclrv2_jax.checkpoints import CheckpointError, SavedRun, all_finite
from simclrv2_jax.checkpoints import workdir as workdir_lib
from simclrv2_jax.config import fields
from simclrv2_jax.config.validation import validate
from simclrv2_jax.data import folders
from simclrv2_jax.train import components, inputs, parallel, reporting
from simclrv2_jax.train.evaluation import eval_totals, mean_metrics
from simclrv2_jax.train.knn import KnnMonitor
from simclrv2_jax.train.step import make_eval_step

# Fields of the saved config that an evaluation may set: where the data comes from and how it is
# batched and sized. Everything else (the network, the classes) is the checkpoint's.
EVAL_FIELDS = {
    "dataset": str,
    "data_dir": str,
    "eval_split": str,
    "eval_batch_size": int,
    "image_size": int,
    "compute_dtype": str,
    "augment_on_device": bool,
    "train_split": str,  # the k-NN bank's split
    "knn_k": int,
    "knn_temperature": float,
    "knn_bank_size": int,
}
RESULTS_NAME = "eval_results.json"
# Which entries of eval_results.json describe the same evaluation (a re-evaluation replaces it).
_SAME_EVALUATION = ("step", "dataset", "eval_split", "image_size", "data_dir", "knn_k", "knn_temperature")
# Fields in which checkpoints of one run may differ without changing the evaluation.
_NOT_EVALUATED = set(fields.RESUME_FREE_FIELDS + fields.RESUME_OPTIMISATION_FIELDS) - set(EVAL_FIELDS)

Variables = collections.namedtuple("Variables", ["params", "batch_stats"])


def evaluation_config(saved: dict[str, Any], overrides: dict[str, Any]) -> ml_collections.ConfigDict:
    """The checkpoint's config (``config.from_saved``) with the evaluation's data fields set; validated."""
    unknown = sorted(set(overrides) - set(EVAL_FIELDS))
    if unknown:
        raise ValueError(
            f"Evaluation cannot change {', '.join(unknown)}: the network and its classes are the "
            f"checkpoint's. Only these fields may be set: {', '.join(EVAL_FIELDS)}."
        )
    try:
        config = config_lib.from_saved(saved)
    except ValueError:
        raise ValueError(
            f"The checkpoint's config has no known stage ({saved.get('stage')!r}); is it a run of this "
            "project?"
        ) from None
    saved_size = config.image_size
    dataset = overrides.get("dataset")
    if dataset is not None and dataset != config.dataset:
        # Another data set brings its own splits (its preset's), unless the split is given too.
        for name, preset in fields.DATASETS.items():
            if dataset in (name, preset["dataset"]):
                dataset = preset["dataset"]
                config.eval_split = preset["eval_split"]
                config.train_split = preset["train_split"]
    for key, value in overrides.items():
        if value is not None:
            config[key] = dataset if key == "dataset" else value
    if (saved_size <= 32) != (config.image_size <= 32):
        small = saved_size <= 32
        raise ValueError(
            f"The checkpoint's network has the {'CIFAR' if small else 'ImageNet'} stem (trained at "
            f"{saved_size} px) but --config.image_size={config.image_size} is on the other side of 32 px, "
            f"where the other stem is used. Evaluate at {'32 px or less' if small else 'more than 32 px'}."
        )
    validate(config)
    return config


def require_supervised_head(config: ml_collections.ConfigDict) -> None:
    """A ``ValueError`` when the run's network has no supervised head whose logits could be evaluated."""
    if config.stage == "pretrain" and not config.get("lineareval_while_pretraining", True):
        raise ValueError(
            "This pretraining run has no supervised head to evaluate (lineareval_while_pretraining=False). "
            "Fine-tune or linearly evaluate it first: python -m simclrv2_jax.main "
            "--config=configs/finetune.py:<dataset> --config.checkpoint=<this workdir>."
        )


class Evaluator:
    """The model of one checkpoint config, its jitted eval step and the evaluation data; with ``knn``
    the k-NN monitor of its ``h`` too (then a network without a supervised head, or whose head has
    other classes than the data, is measured by the k-NN alone)."""

    def __init__(self, config: ml_collections.ConfigDict, mesh, head_mode: str, knn: bool = False) -> None:
        if not knn:
            require_supervised_head(config)
        self.config = config
        parallel.local_batch_size(config.eval_batch_size, mesh, field="eval_batch_size")
        source = inputs.load_source(config)
        inputs.require_labels(source, config.eval_split, "Evaluation")
        classes = config.num_classes or source.num_classes
        self.supervised = True
        if classes != source.num_classes or (
            config.stage == "pretrain" and not config.lineareval_while_pretraining
        ):
            if not knn:
                raise ValueError(
                    f"The checkpoint's supervised head has {classes} classes but data set "
                    f"{config.dataset!r} has {source.num_classes}: evaluate on a data set with the "
                    "checkpoint's classes (--config.dataset=..., --config.data_dir=...), or measure its "
                    "representation with --knn."
                )
            self.supervised = False
        data = inputs.StageInput(config, source, mesh)
        self.model = components.build_model(config, head_mode=head_mode, num_classes=classes, mesh=mesh)
        self.knn = None
        if knn:
            inputs.require_labels(source, config.train_split, "The k-NN's bank")
            knn_config = config.copy_and_resolve_references()
            knn_config.num_classes = source.num_classes
            self.knn = KnnMonitor(knn_config, self.model, source, mesh)
        self.eval_data = data.eval_data()
        self.replicated = parallel.replicated(mesh)
        self.data_sharding = parallel.data_sharding(mesh)
        self.target = components.abstract_variables(self.model, components.image_shape(config, source))
        step = make_eval_step(self.model, preprocess=data.eval_preprocess())
        shardings = Variables(
            *(jax.tree_util.tree_map(lambda _: self.replicated, self.target[k]) for k in Variables._fields)
        )
        self.eval_fn = jax.jit(
            step, in_shardings=(shardings, self.data_sharding), out_shardings=self.replicated
        )

    def __call__(self, run: SavedRun, step: int) -> dict[str, Any]:
        """Top-1, top-5 and loss of checkpoint ``step`` of ``run`` over the split (and ``knn_top1``)."""
        where = run.step_path(step)
        supervised = self.supervised and "head_supervised" in run.modules(step)
        if not supervised and self.knn is None:
            raise CheckpointError(
                f"The checkpoint at {where} has no supervised head to evaluate (a network saved "
                "without one, such as a release checkpoint pretrained without linear evaluation). Fine-tune "
                "it first: python -m simclrv2_jax.main --config=configs/finetune.py:<dataset> "
                "--config.checkpoint=<it>."
            )
        variables, _ = run.load_variables(self.target, sharding=self.replicated, step=step)
        if not all_finite(variables):
            raise CheckpointError(
                f"The checkpoint at {where} holds NaN or infinite weights; there is nothing to evaluate."
            )
        metrics: dict[str, Any] = {}
        if self.knn is not None:
            metrics.update(self.knn(variables["params"], variables["batch_stats"]))
            knn = self.knn.settings
            metrics.update(knn_k=knn.k, knn_temperature=knn.temperature, knn_bank_size=self.knn.bank_size)
        if not supervised:
            return {**metrics, "num_examples": self.knn.num_queries}
        totals = eval_totals(self.eval_data(), Variables(**variables), self.eval_fn, self.data_sharding)
        if not totals.get("count"):
            raise ValueError(
                f"The split {self.config.eval_split!r} of {self.config.dataset!r} gave no examples to "
                "evaluate."
            )
        return {**mean_metrics(totals), **metrics, "num_examples": int(totals["count"])}


# ---------------------------------------------------------------------------------------------------
# Which checkpoints: the latest, one step, or every one as it appears.


def watch(
    list_steps: Callable[[], list[int]],
    *,
    done: Callable[[int | None], bool],
    running: Callable[[], bool],
    timeout_s: float,
    poll_s: float,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> Iterator[int]:
    """Every step ``list_steps`` shows, once each in increasing order, as they appear.

    Ends when nothing is left to evaluate and either ``done(last step yielded)`` (the run finished and
    that was its final checkpoint) or no run is ``running`` and nothing new appeared for ``timeout_s``.
    """
    last: int | None = None
    idle_since = clock()
    while True:
        new = [s for s in list_steps() if last is None or s > last]
        if new:
            for step in new:
                last = step
                yield step
            idle_since = clock()
            continue
        if done(last):
            return
        if running():
            idle_since = clock()
        elif clock() - idle_since >= timeout_s:
            return
        sleep(poll_s)


def run_finished(workdir) -> Callable[[int | None], bool]:
    """``done(step)``: whether the run's results.json says it completed at ``step``."""

    def done(step: int | None) -> bool:
        try:
            results = json.loads((workdir / "results.json").read_text())
        except (FileNotFoundError, ValueError):
            return False
        return bool(results.get("completed")) and step is not None and results.get("final_step") == step

    return done


# ---------------------------------------------------------------------------------------------------
# Results: eval_results.json and TensorBoard.


class Results:
    """``eval_results.json``: every evaluation (one per checkpoint and data setting) and the latest."""

    def __init__(self, output_dir) -> None:
        self.path = output_dir / RESULTS_NAME
        self.entries: list[dict[str, Any]] = []
        if self.path.exists():
            try:
                self.entries = list(json.loads(self.path.read_text()).get("results", []))
            except (ValueError, AttributeError) as e:
                raise ValueError(
                    f"{self.path} is not a results file of this command ({e}); move it away or pass another "
                    "--output_dir."
                ) from None

    @staticmethod
    def _key(entry: dict[str, Any]) -> tuple:
        return tuple(entry.get(k) for k in _SAME_EVALUATION)

    def has(self, entry: dict[str, Any]) -> bool:
        return any(self._key(e) == self._key(entry) for e in self.entries)

    def add(self, entry: dict[str, Any]) -> None:
        self.entries = [e for e in self.entries if self._key(e) != self._key(entry)] + [entry]
        self.entries.sort(key=lambda e: (e["dataset"], e["eval_split"], e["step"]))
        if jax.process_index() != 0:
            return
        payload = {"latest": entry, "results": self.entries}
        tmp = self.path.parent / f".{RESULTS_NAME}.tmp"
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=True))
        tmp.replace(self.path)


def _warn_of_rotated(run: SavedRun, previous: int | None, step: int) -> None:
    """Names the checkpoints a training run saved between ``previous`` and ``step`` (by its
    ``checkpoint_steps``) that were rotated away (``keep_checkpoint_max``) before this evaluator saw
    them."""
    if previous is None:
        return
    try:
        every = int(run.saved_config(step).get("checkpoint_steps", 0))
    except Exception:  # the config of a checkpoint that is going away: nothing to say
        return
    if every <= 0:
        return
    missed = list(range((previous // every + 1) * every, step, every))
    if missed:
        logging.warning(
            "Checkpoints of steps %s were saved and rotated away (keep_checkpoint_max) before they could "
            "be evaluated; raise keep_checkpoint_max to evaluate every one.",
            ", ".join(map(str, missed)),
        )


def describe(metrics: dict[str, Any]) -> str:
    """``top-1 0.8123  top-5 ...  knn 0.7800`` for the metrics an evaluation has."""
    names = (("top1", "top-1"), ("top5", "top-5"), ("loss", "loss"), ("knn_top1", "k-NN top-1"))
    return "  ".join(f"{shown} {metrics[key]:.4f}" for key, shown in names if key in metrics)


class _Session:
    """What one ``evaluate_run`` keeps across checkpoints: the evaluator of the current config, the
    TensorBoard writers per split and the results file."""

    def __init__(self, run: SavedRun, overrides: dict[str, Any], out: epath.Path, mesh, knn: bool) -> None:
        self.run, self.overrides, self.mesh, self.knn = run, overrides, mesh, knn
        self.out = out
        self.results = Results(out)
        self.evaluator_key: str | None = None
        self.evaluator: Evaluator | None = None
        self.writers: dict[str, Any] = {}
        self.added: list[dict[str, Any]] = []

    def _evaluator(self, config: ml_collections.ConfigDict, step: int) -> Evaluator:
        # Checkpoints of one run differ at most in fields that do not change the evaluation (an
        # accepted resume change of the learning rate, say): one evaluator serves them all.
        relevant = {k: v for k, v in config.to_dict().items() if k not in _NOT_EVALUATED}
        key = json.dumps(relevant, sort_keys=True, default=str)
        if key != self.evaluator_key:
            self.evaluator = None  # one model at a time
            self.evaluator = Evaluator(config, self.mesh, self.run.head_mode(step), knn=self.knn)
            self.evaluator_key = key
        return self.evaluator

    def evaluate(self, step: int, skip_done: bool) -> None:
        config = evaluation_config(self.run.saved_config(step), self.overrides)
        entry = {
            "step": step,
            "stage": config.stage,
            "dataset": config.dataset,
            "data_dir": config.data_dir,
            "eval_split": config.eval_split,
            "image_size": config.image_size,
        }
        if self.knn:
            entry.update(knn_k=config.knn_k, knn_temperature=config.knn_temperature)
        if skip_done and self.results.has(entry):
            logging.info("Step %d is already in %s; not evaluated again.", step, self.results.path)
            return
        t0 = time.time()
        metrics = self._evaluator(config, step)(self.run, step)
        entry.update(metrics, checkpoint=os.fspath(self.run.step_path(step)), wall_time_s=time.time() - t0)
        entry["evaluated_at"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        self.results.add(entry)
        self.added.append(entry)
        self._write_scalars(config.eval_split, step, metrics)
        logging.info(
            "Evaluated step %d on %s/%s (%d examples): %s",
            step,
            config.dataset,
            config.eval_split,
            metrics["num_examples"],
            describe(metrics),
        )

    def _write_scalars(self, split: str, step: int, metrics: dict[str, Any]) -> None:
        if split not in self.writers:
            self.writers[split] = reporting.make_writer(os.fspath(self.out / f"eval_{split}"))
        scalars = {f"eval/{k}": metrics[k] for k in ("top1", "top5", "loss", "knn_top1") if k in metrics}
        self.writers[split].write_scalars(step, scalars)
        self.writers[split].flush()

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()


def evaluate_run(
    workdir: str,
    *,
    step: int | None = None,
    every_checkpoint: bool = False,
    overrides: dict[str, Any] | None = None,
    output_dir: str | None = None,
    timeout_s: float = 600.0,
    poll_s: float = 10.0,
    mesh=None,
    knn: bool = False,
) -> list[dict[str, Any]]:
    """Evaluates the checkpoints of ``workdir`` (see the module docstring); returns the new entries."""
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    if step is not None and every_checkpoint:
        raise ValueError("Pass either --step or --every_checkpoint, not both.")
    run = SavedRun(workdir, "--workdir")
    if not every_checkpoint and step is not None:
        step = run.resolve(step)
    out = workdir_lib.prepare(output_dir, "--output_dir") if output_dir else run.root
    session = _Session(run, overrides, out, mesh or parallel.create_mesh(), knn)
    # An image folder's split indexes are kept beside the results.
    with folders.index_home(out):
        return _evaluate_steps(run, session, step, every_checkpoint, timeout_s, poll_s)


def _evaluate_steps(run, session, step, every_checkpoint, timeout_s, poll_s) -> list[dict[str, Any]]:
    try:
        if not every_checkpoint:
            run.first_that_loads(lambda at: session.evaluate(at, skip_done=False), step)
            return session.added
        steps = watch(
            run.steps,
            done=run_finished(run.root),
            running=lambda: workdir_lib.running_run(run.root) is not None,
            timeout_s=timeout_s,
            poll_s=poll_s,
        )
        previous = None
        for at in steps:
            _warn_of_rotated(run, previous, at)
            previous = at
            try:
                session.evaluate(at, skip_done=True)
            except CheckpointError:
                if (run.step_path(at)).exists():
                    raise
                logging.warning(
                    "The checkpoint of step %d was deleted before it could be evaluated (the run keeps "
                    "keep_checkpoint_max of them); raise keep_checkpoint_max to evaluate every one.",
                    at,
                )
        if not session.added and not session.results.entries:
            raise CheckpointError(
                f"No checkpoint appeared under {run.directory} within {timeout_s:g} s and no run is "
                "training there. Start the run, or pass a larger --timeout_s."
            )
        return session.added
    finally:
        session.close()
