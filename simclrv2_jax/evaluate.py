"""Evaluates a run's checkpoints on its evaluation split: ``python -m simclrv2_jax.evaluate --workdir=RUN``.

Any workdir with checkpoints works as it is: a pretraining run (its linear-evaluation head), a
fine-tuning or distillation run, or a converted release checkpoint (``simclrv2_jax.convert``). The
model is built from the config saved beside each checkpoint, and only its weights and BN statistics
are read (never the optimiser state), so a run still training can be evaluated alongside.

* Default: the latest checkpoint (``--step=N``: that one).
* ``--every_checkpoint``: every checkpoint in step order, then each new one as the training run
  saves it (the release's ``mode=eval``), until the run has finished and its last checkpoint is
  evaluated, or no run holds the workdir and nothing new appeared for ``--timeout_s``. Checkpoints
  already in ``eval_results.json`` (same data and image size) are not evaluated again, so a stopped
  evaluator resumes where it was.

The data may differ from the run's (the fields in ``EVAL_FIELDS``), e.g. a converted ImageNet
checkpoint evaluated on a local data set or another split::

    python -m simclrv2_jax.evaluate --workdir=RUN --config.eval_split=validation --config.data_dir=DIR

Results: top-1, top-5 and the cross-entropy loss of the supervised head over the whole split, in
``OUTPUT/eval_results.json`` (``latest`` and every evaluation under ``results``) and TensorBoard
(``OUTPUT/eval_<split>/``, tags ``eval/top1``, ``eval/top5``, ``eval/loss``, at the checkpoint's
step). ``OUTPUT`` is ``--output_dir``, by default the workdir.
"""

from __future__ import annotations

import collections
import json
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import ml_collections

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
}
RESULTS_NAME = "eval_results.json"
# Which entries of eval_results.json describe the same evaluation (a re-evaluation replaces it).
_SAME_EVALUATION = ("step", "dataset", "eval_split", "image_size", "data_dir")

Variables = collections.namedtuple("Variables", ["params", "batch_stats"])


def override_fields() -> ml_collections.ConfigDict:
    """The ``--config.<field>`` overrides the command accepts; None = the checkpoint's value."""
    c = ml_collections.ConfigDict()
    for name, kind in EVAL_FIELDS.items():
        c[name] = ml_collections.FieldReference(None, field_type=kind)
    return c


def bad_override_message(error: BaseException) -> str:
    """The one ``error:`` line for a flag this command does not take or whose value does not parse."""
    from simclrv2_jax.cli import _unknown_field

    allowed = ", ".join(f"--config.{name}" for name in EVAL_FIELDS)
    if isinstance(error, (AttributeError, KeyError)):
        return (
            f"error: bad command line (evaluation cannot set {_unknown_field(error)}: the network and its "
            f"classes are the checkpoint's). Only the data settings may be given: {allowed}."
        )
    return (
        f"error: bad command line ({' '.join(str(error).split())}). See --help for the flags and their types."
    )


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing with a mistake reported in one line (exit code 2)."""
    import sys

    from absl import flags

    from simclrv2_jax.cli import COMMAND_LINE_ERRORS

    try:
        return flags.FLAGS(argv)
    except COMMAND_LINE_ERRORS as e:
        print(bad_override_message(e), file=sys.stderr)
        sys.exit(2)


def evaluation_config(saved: dict[str, Any], overrides: dict[str, Any]) -> ml_collections.ConfigDict:
    """The checkpoint's config with the evaluation's data fields set; validated."""
    from simclrv2_jax import fields
    from simclrv2_jax.validation import validate

    unknown = sorted(set(overrides) - set(EVAL_FIELDS))
    if unknown:
        raise ValueError(
            f"Evaluation cannot change {', '.join(unknown)}: the network and its classes are the "
            f"checkpoint's. Only these fields may be set: {', '.join(EVAL_FIELDS)}."
        )
    stage = saved.get("stage")
    if stage not in fields.STAGES:
        raise ValueError(
            f"The checkpoint's config has no known stage ({stage!r}); is it a run of this project?"
        )
    # Fields a later version added take their defaults; fields it dropped are left out.
    config = fields.get_config(stage)
    for key, value in saved.items():
        if key in config:
            config[key] = tuple(value) if isinstance(config[key], tuple) else value
    saved_size = config.image_size
    dataset = overrides.get("dataset")
    if dataset is not None and dataset != config.dataset:
        # Another data set brings its own splits (its preset's), unless the split is given too.
        for name, preset in fields.DATASETS.items():
            if dataset in (name, preset["dataset"]):
                dataset = preset["dataset"]
                config.eval_split = preset["eval_split"]
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


def head_mode(config: ml_collections.ConfigDict) -> str:
    """The model mode whose ``logits_sup`` are evaluated; an error when the run has no such head."""
    if config.stage != "pretrain":
        return "finetune"
    if not config.get("lineareval_while_pretraining", True):
        raise ValueError(
            "This pretraining run has no supervised head to evaluate (lineareval_while_pretraining=False). "
            "Fine-tune or linearly evaluate it first: python -m simclrv2_jax.main "
            "--config=configs/finetune.py:<dataset> --config.checkpoint=<this workdir>."
        )
    return "pretrain"


class Evaluator:
    """The model of one checkpoint config, its jitted eval step and the evaluation data."""

    def __init__(self, config: ml_collections.ConfigDict, mesh) -> None:
        import jax
        import jax.numpy as jnp

        from simclrv2_jax import parallel
        from simclrv2_jax.train import components, inputs
        from simclrv2_jax.train.step import make_eval_step

        self.config = config
        self.mesh = mesh
        mode = head_mode(config)
        parallel.local_batch_size(config.eval_batch_size, mesh, field="eval_batch_size")
        source = inputs.load_source(config)
        source_classes = source.num_classes
        classes = config.num_classes or source_classes
        if classes != source_classes:
            raise ValueError(
                f"The checkpoint's supervised head has {classes} classes but data set {config.dataset!r} "
                f"has {source_classes}: evaluate on a data set with the checkpoint's classes "
                "(--config.dataset=..., --config.data_dir=...)."
            )
        data = inputs.StageInput(config, source, mesh)
        self.model = components.build_model(config, head_mode=mode, num_classes=classes, mesh=mesh)
        self.num_classes = classes
        self.eval_data = data.eval_data()
        self.replicated = parallel.replicated(mesh)
        self.data_sharding = parallel.data_sharding(mesh)
        images = jax.ShapeDtypeStruct((2, *components.image_shape(config, source)), jnp.float32)
        abstract = jax.eval_shape(lambda x: self.model.init(jax.random.key(0), x, train=False), images)
        self.target = {"params": abstract["params"], "batch_stats": abstract["batch_stats"]}
        step = make_eval_step(self.model, preprocess=data.eval_preprocess())
        shardings = Variables(
            *(jax.tree_util.tree_map(lambda _: self.replicated, self.target[k]) for k in Variables._fields)
        )
        self.eval_fn = jax.jit(
            step, in_shardings=(shardings, self.data_sharding), out_shardings=self.replicated
        )

    def __call__(self, checkpoint: str) -> dict[str, Any]:
        """Top-1, top-5 and loss of the checkpoint at ``checkpoint`` (a step folder) over the split."""
        from simclrv2_jax import checkpoints
        from simclrv2_jax.train.loop import eval_totals

        if "head_supervised" not in checkpoints.saved_modules(checkpoint):
            raise checkpoints.CheckpointError(
                f"The checkpoint at {checkpoint} has no supervised head to evaluate (a network saved "
                "without one, such as a release checkpoint pretrained without linear evaluation). Fine-tune "
                "it first: python -m simclrv2_jax.main --config=configs/finetune.py:<dataset> "
                "--config.checkpoint=<it>."
            )
        variables, _ = checkpoints.load_variables(
            checkpoint, self.target, sharding=self.replicated, what="checkpoint"
        )
        if not checkpoints.all_finite(variables):
            raise checkpoints.CheckpointError(
                f"The checkpoint at {checkpoint} holds NaN or infinite weights; there is nothing to evaluate."
            )
        totals = eval_totals(self.eval_data(), Variables(**variables), self.eval_fn, self.data_sharding)
        count = totals.pop("count", 0.0)
        if not count:
            raise ValueError(
                f"The split {self.config.eval_split!r} of {self.config.dataset!r} gave no examples to "
                "evaluate."
            )
        return {**{k: v / count for k, v in totals.items()}, "num_examples": int(count)}


# ---------------------------------------------------------------------------------------------------
# Which checkpoints: the latest, one step, or every one as it appears.


def saved_steps(directory) -> list[int]:
    """The finished checkpoint steps in a ``checkpoints/`` folder (half-written saves are not listed)."""
    try:
        children = list(directory.iterdir())
    except FileNotFoundError:
        return []
    return sorted(int(c.name) for c in children if c.name.isdigit() and (c / "state").exists())


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
        import jax

        self.entries = [e for e in self.entries if self._key(e) != self._key(entry)] + [entry]
        self.entries.sort(key=lambda e: (e["dataset"], e["eval_split"], e["step"]))
        if jax.process_index() != 0:
            return
        payload = {"latest": entry, "results": self.entries}
        tmp = self.path.parent / f".{RESULTS_NAME}.tmp"
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=True))
        tmp.replace(self.path)


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
) -> list[dict[str, Any]]:
    """Evaluates the checkpoints of ``workdir`` (see the module docstring); returns the new entries."""
    from absl import logging
    from etils import epath

    from simclrv2_jax import checkpoints, parallel
    from simclrv2_jax import workdir as workdir_lib
    from simclrv2_jax.train import reporting

    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    if step is not None and every_checkpoint:
        raise ValueError("Pass either --step or --every_checkpoint, not both.")
    root = epath.Path(workdir if "://" in os.fspath(workdir) else os.path.abspath(workdir))
    if every_checkpoint:
        if not root.exists():
            raise checkpoints.CheckpointError(f"The workdir {workdir} does not exist.")
        directory = root / checkpoints.CHECKPOINT_SUBDIR
    else:
        directory, latest = checkpoints.checkpoint_dir(workdir, "--workdir")
        if step is not None:
            available = saved_steps(directory)
            if step not in available:
                raise checkpoints.CheckpointError(
                    f"No checkpoint of step {step} under {workdir}; it has steps {available}."
                )
        step = latest if step is None else step
    out = workdir_lib.prepare(output_dir) if output_dir else root
    results = Results(out)
    mesh = mesh or parallel.create_mesh()
    evaluators: dict[str, Evaluator] = {}
    writers: dict[str, Any] = {}
    added: list[dict[str, Any]] = []

    def evaluate_step(at: int) -> None:
        path = directory / str(at)
        saved = checkpoints.read_config(os.fspath(path))
        config = evaluation_config(saved, overrides)
        # Checkpoints of one run differ at most in fields that do not change the evaluation (an
        # accepted resume change of the learning rate, say): one evaluator serves them all.
        from simclrv2_jax import fields

        ignored = set(fields.RESUME_FREE_FIELDS + fields.RESUME_OPTIMISATION_FIELDS) - set(EVAL_FIELDS)
        relevant = {k: v for k, v in config.to_dict().items() if k not in ignored}
        key = json.dumps(relevant, sort_keys=True, default=str)
        if key not in evaluators:
            evaluators.clear()  # one model at a time (a run's checkpoints share one config)
            evaluators[key] = Evaluator(config, mesh)
        entry = {
            "step": at,
            "stage": config.stage,
            "dataset": config.dataset,
            "data_dir": config.data_dir,
            "eval_split": config.eval_split,
            "image_size": config.image_size,
        }
        if every_checkpoint and results.has(entry):
            logging.info("Step %d is already in %s; not evaluated again.", at, results.path)
            return
        t0 = time.time()
        metrics = evaluators[key](os.fspath(path))
        entry.update(metrics, checkpoint=os.fspath(path), wall_time_s=time.time() - t0)
        entry["evaluated_at"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        results.add(entry)
        added.append(entry)
        split = config.eval_split
        if split not in writers:
            writers[split] = reporting.make_writer(os.fspath(out / f"eval_{split}"))
        writers[split].write_scalars(at, {f"eval/{k}": metrics[k] for k in ("top1", "top5", "loss")})
        writers[split].flush()
        logging.info(
            "Evaluated step %d on %s/%s (%d examples): top-1 %.4f, top-5 %.4f, loss %.4f",
            at,
            config.dataset,
            split,
            metrics["num_examples"],
            metrics["top1"],
            metrics["top5"],
            metrics["loss"],
        )

    try:
        if not every_checkpoint:
            evaluate_step(step)
        else:
            steps = watch(
                lambda: saved_steps(directory),
                done=run_finished(root),
                running=lambda: workdir_lib.running_run(root) is not None,
                timeout_s=timeout_s,
                poll_s=poll_s,
            )
            for at in steps:
                try:
                    evaluate_step(at)
                except checkpoints.CheckpointError:
                    if (directory / str(at)).exists():
                        raise
                    logging.warning(
                        "The checkpoint of step %d was deleted before it could be evaluated (the run keeps "
                        "keep_checkpoint_max of them); raise keep_checkpoint_max to evaluate every one.",
                        at,
                    )
            if not added and not results.entries:
                raise checkpoints.CheckpointError(
                    f"No checkpoint appeared under {directory} within {timeout_s:g} s and no run is "
                    "training there. Start the run, or pass a larger --timeout_s."
                )
    finally:
        for writer in writers.values():
            writer.close()
    return added


def main(argv: list[str]) -> int:
    from absl import app

    from simclrv2_jax.cli import run_reporting_user_errors, start_up

    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    start_up()
    overrides = {k: v for k, v in _CONFIG.value.items() if v is not None}

    def evaluate() -> list[dict[str, Any]]:
        from simclrv2_jax.train.loop import Interrupted

        try:
            return evaluate_run(
                _WORKDIR.value,
                step=_STEP.value,
                every_checkpoint=_EVERY.value,
                overrides=overrides,
                output_dir=_OUTPUT.value,
                timeout_s=_TIMEOUT.value,
                poll_s=_POLL.value,
            )
        except KeyboardInterrupt:
            raise Interrupted(
                f"Evaluation stopped by Ctrl-C. Finished evaluations are in {RESULTS_NAME}; run the same "
                "command to go on."
            ) from None

    code, added = run_reporting_user_errors(evaluate)
    if code == 0:
        for entry in added:
            print(
                f"step {entry['step']}: top-1 {entry['top1']:.4f}  top-5 {entry['top5']:.4f}  "
                f"loss {entry['loss']:.4f}  ({entry['num_examples']} examples of "
                f"{entry['dataset']}/{entry['eval_split']})"
            )
    return code


if __name__ == "__main__":
    import sys

    from absl import app, flags
    from ml_collections import config_flags

    from simclrv2_jax.cli import COMMAND_LINE_ERRORS

    _WORKDIR = flags.DEFINE_string(
        "workdir", None, "The run to evaluate (or a converted checkpoint's workdir)."
    )
    _STEP = flags.DEFINE_integer("step", None, "Evaluate this checkpoint step (default: the latest).")
    _EVERY = flags.DEFINE_bool(
        "every_checkpoint", False, "Evaluate every checkpoint, and each new one as the run saves it."
    )
    _OUTPUT = flags.DEFINE_string("output_dir", None, f"Where {RESULTS_NAME} goes (default: the workdir).")
    _TIMEOUT = flags.DEFINE_float(
        "timeout_s",
        600.0,
        "With --every_checkpoint: stop after this long with nothing new and no run training.",
    )
    _POLL = flags.DEFINE_float(
        "poll_s", 10.0, "With --every_checkpoint: seconds between looks for new checkpoints."
    )
    try:  # a config_dict flag reads its overrides from sys.argv when it is defined
        _CONFIG = config_flags.DEFINE_config_dict(
            "config", override_fields(), f"Data settings: --config.<field> for {', '.join(EVAL_FIELDS)}."
        )
    except COMMAND_LINE_ERRORS as e:
        print(bad_override_message(e), file=sys.stderr)
        sys.exit(2)
    flags.mark_flags_as_required(["workdir"])
    app.run(main, flags_parser=parse_flags)
