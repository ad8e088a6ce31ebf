"""CLI plumbing shared by the step programs: options, value parsing, one-line errors."""
from __future__ import annotations

import contextlib
import functools
from datetime import timedelta
import os
import signal
import subprocess
import sys

import click

from pipeline.checkpoint import CheckpointError
from pipeline.config import PROFILES, ConfigError
from pipeline.data import DataError
from pipeline.guards import GuardError
from pipeline.models.bridge import VisualTokenError
from pipeline.models.llm import LLMLoadError, TrainableLLMError
from pipeline.tracking.outage import patience
from pipeline.tracking.runs import TRACKING_ERRORS
from pipeline.train.distributed import join_world, leave_world

# Errors that end a step with a one-line reason on stderr and a non-zero exit code: the
# project's own (bad input, a guard, a refusal) and a missing file or model reference. Any
# other error (a bug) keeps its traceback and exits 1.
EXPECTED_ERRORS = (ConfigError, DataError, GuardError, CheckpointError, VisualTokenError,
                   TrainableLLMError, LLMLoadError, FileNotFoundError, *TRACKING_ERRORS)
EXIT_REFUSED = 2
EXIT_INTERRUPTED = 130


def profile_option(func):
    """`--profile tiny|demo|default`."""
    return click.option("--profile", type=click.Choice(PROFILES), default="default",
                        show_default=True, help="model sizes, data subset and epochs")(func)


def device_option(func):
    """`--device auto|cpu|cuda[:N]` (auto: CUDA when available)."""
    return click.option("--device", default="auto", show_default=True,
                        help="auto | cpu | cuda | cuda:N (auto: CUDA when available; under "
                             "torchrun each rank takes its LOCAL_RANK's GPU)")(func)


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
            if os.environ.get("RANK", "0") == "0":  # rank 0 speaks for a torchrun group
                click.echo("interrupted: the last checkpoint was saved and the run ended "
                           "KILLED", err=True)
            sys.exit(EXIT_INTERRUPTED)
        except EXPECTED_ERRORS as exc:
            if getattr(exc, "reported_by_rank0", False):
                sys.exit(EXIT_REFUSED)
            message = " ".join(str(getattr(exc, "message", None) or exc).split())
            click.echo(f"error: {type(exc).__name__}: {message}", err=True)
            sys.exit(EXIT_REFUSED)
    return wrapper


def nproc_option(module: str):
    """`--nproc N`: above 1 (and not already under torchrun), run `module` again under
    `python -m torch.distributed.run --standalone --nproc_per_node N` with the same options
    and exit with its status."""
    def decorate(func):
        @click.option("--nproc", default="1", show_default=True,
                      help="processes (data-parallel ranks); above 1 runs under torchrun")
        @functools.wraps(func)
        def wrapper(*args, nproc, **kwargs):
            count = auto(nproc, int) or 1
            if count > 1 and "WORLD_SIZE" not in os.environ:
                sys.exit(_torchrun(module, count, kwargs))
            return func(*args, **kwargs)
        return wrapper
    return decorate


def _torchrun(module: str, nproc: int, params: dict) -> int:
    options = {p.name: p.opts[0] for p in click.get_current_context().command.params}
    args = []
    for name, value in params.items():
        if value is None or value is False:
            continue
        args += [options[name]] if value is True else [options[name], str(value)]
    launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                 "--nproc_per_node", str(nproc), "-m", module, *args],
                                start_new_session=True)
    # A stop meant for this program (Ctrl-C included: torchrun has a session of its own, so
    # it gets each stop once) goes to torchrun, which passes it to every rank (rank 0 saves
    # and ends its run KILLED); this program waits for them and exits with torchrun's status.
    stopped: list[int] = []

    def forward(signum, _frame):
        stopped.append(signum)
        launcher.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        status = launcher.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return EXIT_INTERRUPTED if stopped and status != 0 else status


@contextlib.contextmanager
def distributed_world(device: str = "auto"):
    """This process's data-parallel world (torchrun's, or a single process) on the device
    `device` resolves to; closed after.

    Its collectives wait longer than rank 0 may spend retrying uploads at the end (each call
    up to `patience()` plus MLflow's own ~4 min of retries, for a few calls), so the other
    ranks at the final barrier do not time out while rank 0 rides out a tracking outage.
    """
    world = join_world(device, timedelta(seconds=max(30 * 60, 3 * (patience() + 300))))
    try:
        yield world
        # Every rank leaves together: a rank that tore its group down while rank 0 still
        # ended its run could abort at exit (gloo), and torchrun would then stop rank 0.
        world.barrier()
    except BaseException as exc:
        world.part_after(exc)
        raise
    finally:
        leave_world(world)
