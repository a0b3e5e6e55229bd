"""What the commands share: logging set-up, one-line flag errors, start-up, user errors as exit codes."""

from __future__ import annotations

import logging as logging_std
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from absl import flags, logging
from ml_collections import ConfigDict, FieldReference


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


# What absl and ml_collections raise for a config override that names no field (AttributeError,
# KeyError) or whose value does not parse as the field's type (flags.Error, ValueError, TypeError).
COMMAND_LINE_ERRORS = (AttributeError, KeyError, TypeError, ValueError, flags.Error)


def unknown_field(error: BaseException) -> str:
    """``'nosuch'`` out of ml_collections' nested ``AttributeError(KeyError("'nosuch'"))``, its
    "Did you mean" suggestion (after a newline) kept on the same line."""
    while error.args and isinstance(error.args[0], BaseException):
        error = error.args[0]
    text = str(error.args[0]) if error.args else str(error)
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def _override_name(arg: str) -> str:
    """``pretrain.train_steps`` from ``--pretrain.train_steps=5`` (or the boolean ``--nopretrain.x``)."""
    name = arg.split("=", 1)[0].lstrip("-")
    flag = name.split(".", 1)[0]
    if flag not in flags.FLAGS and flag.startswith("no") and flag[2:] in flags.FLAGS:
        name = name[2:]
    return name


def bad_command_line_message(error: BaseException, argv: Sequence[str]) -> str:
    """The one ``error:`` line for a mistake on the command line: an unknown config field or a value
    of the wrong type in an override such as ``--config.train_steps=abc``, listing the overrides."""
    overrides = sorted({_override_name(a) for a in argv[1:] if a.startswith("-") and "." in a.split("=")[0]})
    text = str(error)
    if "Traceback (most recent call last)" in text:
        # ml_collections embeds the config file's traceback: its last line is the actual error.
        text = (
            text.split("Traceback (most recent call last)", 1)[0]
            + [line for line in text.splitlines() if line.strip()][-1].strip()
        )
    what = (
        f"unknown config field {unknown_field(error)}"
        if isinstance(error, (AttributeError, KeyError))
        else " ".join(text.split())
    )
    flag = overrides[0].split(".", 1)[0] if overrides else "config"
    return (
        f"error: bad command line ({what}). Config overrides given: {', '.join(overrides) or 'none'}. "
        f"Each must name an existing field with a value of its type, e.g. --{flag}.train_batch_size=256; "
        "the fields are listed in the config file and README."
    )


def exit_bad_command_line(error: BaseException, argv: Sequence[str]) -> NoReturn:
    """Prints ``bad_command_line_message`` on stderr and exits with code 2."""
    print(bad_command_line_message(error, argv), file=sys.stderr)
    sys.exit(2)


def config_value(holder: flags.FlagHolder, name: str = "config"):
    """The ConfigDict of a ``--config``-style flag; a config file that does not load is one error line.

    ml_collections loads the file lazily, when the value is first read, and reports a missing file
    as an OSError with the paths it tried.
    """
    try:
        value = holder.value
        value.keys()  # a file that failed to load gives a placeholder that raises on first use
        return value
    except OSError as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        print(
            f"error: the --{name} file does not load: {' '.join(lines[-2:]) if lines else e}. Pass a config "
            f"file such as --{name}=configs/pretrain.py:fashion_mnist (see configs/).",
            file=sys.stderr,
        )
        sys.exit(2)


def parse_flags(argv: list[str], message: Callable[[BaseException], str] | None = None) -> list[str]:
    """absl flag parsing, with an unknown or mistyped config override reported in one line
    (``message(error)``, by default ``bad_command_line_message``) and exit code 2."""
    try:
        return flags.FLAGS(argv)
    except COMMAND_LINE_ERRORS as e:
        if message is None:
            exit_bad_command_line(e, argv)
        print(message(e), file=sys.stderr)
        sys.exit(2)


def start_up() -> None:
    """What every command does first: logging, TF kept off accelerators, joining a multi-host job."""
    from simclrv2_jax.train import parallel

    configure_logging()
    parallel.initialize_distributed()


def run_reporting_user_errors(fn, *args):
    """``(exit code, result)`` of ``fn(*args)``.

    A user's mistake (config, data, checkpoint, workdir) becomes one ``error:`` line and exit code 2;
    a diverged run (its last finite state saved) one ``error:`` line and exit code 3; an interrupt the
    line saying what was saved and exit code 128 + the signal (130 for Ctrl-C, 143 for SIGTERM).
    """
    import signal

    from simclrv2_jax.checkpoints import CheckpointError
    from simclrv2_jax.train.loop import Interrupted, TrainingDiverged

    try:
        return 0, fn(*args)
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 3, None
    except (ValueError, FileNotFoundError, CheckpointError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2, None
    except Interrupted as e:
        print(e.message, file=sys.stderr)
        return 128 + int(e.signum), None
    except KeyboardInterrupt:
        print(
            "Interrupted at once: nothing more was saved. Run the same command to resume from the "
            "workdir's last checkpoint, if it has one.",
            file=sys.stderr,
        )
        return 128 + int(signal.SIGINT), None


def data_override_fields(fields: dict[str, type]) -> ConfigDict:
    """The ``--config.<field>`` overrides of a command reading a saved run (``evaluate``, ``explore``):
    each of ``fields`` (name -> type), None = the saved run's value."""
    c = ConfigDict()
    for name, kind in fields.items():
        c[name] = FieldReference(None, field_type=kind)
    return c


def data_override_message(error: BaseException, fields: dict[str, type]) -> str:
    """The one ``error:`` line for a ``data_override_fields`` flag that is not one of ``fields`` or whose
    value does not parse."""
    allowed = ", ".join(f"--config.{name}" for name in fields)
    if isinstance(error, (AttributeError, KeyError)):
        return (
            f"error: bad command line (evaluation cannot set {unknown_field(error)}: the network and its "
            f"classes are the checkpoint's). Only the data settings may be given: {allowed}."
        )
    return (
        f"error: bad command line ({' '.join(str(error).split())}). See --help for the flags and their types."
    )


def define_data_overrides(fields: dict[str, type], help_text: str):
    """The ``--config`` flag of a command reading a saved run: ``--config.<field>`` for each of
    ``fields``. ml_collections reads the overrides from sys.argv as the flag is defined, so a mistake
    is reported here, in one ``error:`` line and exit code 2."""
    from ml_collections import config_flags

    try:
        return config_flags.DEFINE_config_dict("config", data_override_fields(fields), help_text)
    except COMMAND_LINE_ERRORS as e:
        print(data_override_message(e, fields), file=sys.stderr)
        sys.exit(2)


def data_flags_parser(fields: dict[str, type]) -> Callable[[list[str]], list[str]]:
    """``parse_flags`` for such a command, its mistakes worded by ``data_override_message``."""
    return lambda argv: parse_flags(argv, lambda e: data_override_message(e, fields))
