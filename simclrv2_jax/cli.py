"""Command-line plumbing shared by ``main`` and ``pipeline``: logging set-up and flag errors."""

from __future__ import annotations

import logging as logging_std
import sys

from absl import flags, logging


class _QuietLibraries(logging_std.Filter):
    """Drops the INFO chatter of Orbax's save machinery; its warnings and errors still show."""

    def filter(self, record: logging_std.LogRecord) -> bool:
        return record.levelno >= logging_std.WARNING or "/orbax/" not in record.pathname


def configure_logging() -> None:
    """INFO lines (progress, metrics, ETA) on stderr, without the libraries' INFO chatter."""
    logging.set_verbosity(logging.INFO)
    logging.use_absl_handler()
    handler = logging.get_absl_handler()
    if not any(isinstance(f, _QuietLibraries) for f in handler.filters):
        handler.addFilter(_QuietLibraries())
    if not flags.FLAGS.is_parsed() or not flags.FLAGS["log_dir"].value:
        logging.get_absl_handler().python_handler.stream = sys.stderr


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, with an unknown or mistyped config override reported in one line."""
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError, TypeError, ValueError, flags.Error) as e:
        overrides = sorted({a.split("=")[0][2:] for a in argv[1:] if "." in a.split("=")[0]})
        what = f"unknown config field {e}" if isinstance(e, (AttributeError, KeyError)) else str(e)
        print(
            f"error: bad command line ({what}). Config overrides given: {', '.join(overrides) or 'none'}. "
            "Each must name an existing field with a value of its type, e.g. "
            "--config.train_batch_size=256; the fields are listed in the config file and README.",
            file=sys.stderr,
        )
        sys.exit(2)


def start_up() -> None:
    """What every command does first: logging, TF kept off accelerators, joining a multi-host job."""
    from simclrv2_jax import parallel

    configure_logging()
    parallel.initialize_distributed()


def run_reporting_user_errors(fn, *args):
    """``(exit code, result)`` of ``fn(*args)``; a user's mistake (config, data, checkpoint) becomes one
    ``error:`` line and exit code 2, an interruption (after its checkpoint is saved) exit code 130."""
    from simclrv2_jax.checkpoints import CheckpointError

    try:
        return 0, fn(*args)
    except (ValueError, FileNotFoundError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2, None
    except KeyboardInterrupt:
        print("Interrupted; a checkpoint was saved. Run the same command to resume.", file=sys.stderr)
        return 130, None
