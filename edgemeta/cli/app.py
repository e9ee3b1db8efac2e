"""The click group `main` and what every command shares: bounded numeric options, the one-line errors, a
closed stdout; the commands register on it from their own modules (cli/__init__.py lists them)."""

from __future__ import annotations

import os
import sys
import traceback

import click

from edgemeta.errors import EdgemetaError

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# numpy's OpenBLAS starts a thread per core at import; on a loaded board (or under a process limit)
# it cannot, and it then raises SIGINT, which read as "interrupted". The board's numpy work is small
# vectors, and training runs in TensorFlow: one BLAS thread costs nothing here. A user's own setting wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


class Finite(click.FloatRange):
    """A float range that also refuses NaN and infinity (click's own lets NaN through every bound)."""

    def convert(self, value, param, ctx):
        rv = super().convert(value, param, ctx)
        if rv != rv or rv in (float("inf"), float("-inf")):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return rv


def whole(lo: int, hi: int) -> click.IntRange:
    """Every whole-number option has both bounds (tests/test_cli_hardening.py walks the CLI for it)."""
    return click.IntRange(lo, hi)


def seconds(lo: float, hi: float) -> Finite:
    return Finite(lo, hi)


class _ClosedStdout:
    """sys.stdout that survives its reader going away (`edgemeta classes | head -1`): the first write
    into a closed pipe points stdout at /dev/null, and the command goes on to finish its work (a
    store write is never cut short by output nobody reads) and exits as it would have."""

    def __init__(self, stream):
        self._stream = stream

    def _gone(self) -> None:
        try:
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, self._stream.fileno())
            os.close(null)
        except (OSError, ValueError):
            pass

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._gone()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._gone()
            try:
                self._stream.flush()  # what was buffered now goes to /dev/null
            except OSError:
                pass

    def __getattr__(self, name: str):  # buffer too: `serve --stdio` answers on it and handles its own hang-up
        return getattr(self._stream, name)


def _known_failure(e: BaseException) -> str | None:
    """The one-line story of a failure that is the machine's, not edgemeta's: what ran out, or a
    permission the library did not name itself; None for anything else."""
    if isinstance(e, PermissionError):
        from edgemeta.errors import denied

        return str(denied(e.filename, "use")) if e.filename else f"permission denied: {e.strerror}"
    if isinstance(e, MemoryError):
        return "not enough memory for this command; close other programs, use smaller inputs, or add swap"
    if isinstance(e, RuntimeError) and "can't start new thread" in str(e):
        return ("the system refused a new thread: the limit on processes/threads (ulimit -u, a container's pids limit) "
                "or memory is exhausted; free some or raise the limit")
    if isinstance(e, KeyboardInterrupt):  # OpenBLAS raises SIGINT when it cannot start its threads at import
        tb, frames = e.__traceback__, []
        while tb is not None:
            frames.append(tb.tb_frame.f_code.co_filename)
            tb = tb.tb_next
        if any(f"{os.sep}numpy{os.sep}" in f for f in frames[-3:]):
            return (f"numpy's BLAS could not start its {os.environ.get('OPENBLAS_NUM_THREADS')} thread(s) (the lines above "
                    "say why): the process/thread limit or memory is exhausted; run with OPENBLAS_NUM_THREADS=1 or raise the limit")
    return None


class _Group(click.Group):
    """Turns library errors into one line and an exit status, with the traceback behind --debug."""

    def main(self, *args, **kwargs):
        if not isinstance(sys.stdout, _ClosedStdout) and sys.stdout is not None:
            sys.stdout = _ClosedStdout(sys.stdout)
        return super().main(*args, **kwargs)

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.UsageError as e:  # `edgemeta --bogus`: one line, as below
            if isinstance(e, getattr(click.exceptions, "NoArgsIsHelpError", ())):  # bare `edgemeta`: click's help
                raise
            click.echo(f"error: {e.format_message()} (see `edgemeta --help`)", err=True)
            sys.exit(2)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except EdgemetaError as e:
            if ctx.obj and ctx.obj.get("debug"):
                traceback.print_exc()
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except click.UsageError as e:  # a subcommand's own options: the same one-line form as every other error
            cmd = f"edgemeta {e.ctx.info_name} --help" if e.ctx and e.ctx.parent else "edgemeta --help"
            click.echo(f"error: {e.format_message()} (see `{cmd}`)", err=True)
            sys.exit(2)
        except (click.exceptions.Exit, click.ClickException, click.Abort, SystemExit):
            raise
        except (KeyboardInterrupt, Exception) as e:
            why = _known_failure(e)
            if why is None and isinstance(e, KeyboardInterrupt):
                click.echo("interrupted", err=True)
                sys.exit(130)
            if ctx.obj and ctx.obj.get("debug"):
                traceback.print_exc()
            if why is not None:
                click.echo(f"error: {why}", err=True)
                sys.exit(2)
            click.echo(f"error: unexpected {type(e).__name__}: {e} (run with --debug for the traceback, "
                       "and please report it)", err=True)
            sys.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.version_option(package_name="edgemeta")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """edgemeta: meta-train few-shot models on the host, run them on the board.

    \b
    Example:
      edgemeta train --config models/omniglot-vinyals-conv4/config.toml --data ../shared/data/omniglot --out runs/vinyals
      edgemeta eval --model models/omniglot-vinyals-conv4 --data ../shared/data/omniglot
    """
    ctx.obj = {"debug": debug}
