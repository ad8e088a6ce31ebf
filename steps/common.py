"""CLI plumbing shared by the step programs: options, value parsing, one-line errors."""
from __future__ import annotations

import functools
import sys

import click

from pipeline.checkpoint import CheckpointError
from pipeline.config import PROFILES, ConfigError
from pipeline.data import DataError
from pipeline.guards import GuardError
from pipeline.models.llm import LLMLoadError, TrainableLLMError
from pipeline.tracking.runs import TRACKING_ERRORS

# Errors that end a step with a one-line reason on stderr and a non-zero exit code.
EXPECTED_ERRORS = (ConfigError, DataError, GuardError, CheckpointError, TrainableLLMError,
                   LLMLoadError, ValueError, FileNotFoundError, *TRACKING_ERRORS)
EXIT_REFUSED = 2
EXIT_INTERRUPTED = 130


def profile_option(func):
    """`--profile tiny|demo|default`."""
    return click.option("--profile", type=click.Choice(PROFILES), default="default",
                        show_default=True, help="model sizes, data subset and epochs")(func)


def auto(value, cast):
    """Parse an MLproject value where '' / 'auto' / 'none' mean: take the profile's."""
    if value is None or str(value).strip().lower() in ("", "auto", "none"):
        return None
    try:
        return cast(value)
    except ValueError as exc:
        raise click.BadParameter(f"{value!r} is not a valid {cast.__name__}") from exc


def one_line_errors(func):
    """Turn expected failures into `error: <reason>` on stderr and a non-zero exit."""
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except KeyboardInterrupt:
            click.echo("interrupted: the last checkpoint was saved and the run ended KILLED",
                       err=True)
            sys.exit(EXIT_INTERRUPTED)
        except EXPECTED_ERRORS as exc:
            message = " ".join(str(getattr(exc, "message", None) or exc).split())
            click.echo(f"error: {type(exc).__name__}: {message}", err=True)
            sys.exit(EXIT_REFUSED)
    return wrapper
