"""The `edgemeta` command line. Commands are thin: parse, call the library, print.

One click group, `main`, with the error handling every command shares; the commands are in one
module per audience, imported at the bottom so that they register:
    host.py      train, eval, export, inspect, edgetpu (the host with TensorFlow; inspect and edgetpu need none)
    board.py     enroll, classify, classes, forget, rename, adapt, reenroll, demo, health, serve (the board:
                 runtime only, never TensorFlow)
    fleet.py     boards, keygen, bundle, deploy, rollback, remote, doctor (reaching boards from the host)
    firmware.py  provision, console (below the application: boot partition, UART console)
Every module imports its library lazily, inside the commands, so `edgemeta --help` and the board's
commands start without TensorFlow.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

import click

from edgemeta.errors import EdgemetaError

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


class _Group(click.Group):
    """Turns library errors into one line and an exit status, with the traceback behind --debug."""

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
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except Exception as e:
            if ctx.obj and ctx.obj.get("debug"):
                traceback.print_exc()
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


# --- shared by the board's commands and `edgemeta remote` ---------------------------------------


def adapt_setting(steps: str, lr: str | None) -> tuple[int, float | None]:
    """--steps/--adapt and --lr, parsed here (not by click) so that bad values get the one-line error."""
    from edgemeta.runtime.store import MAX_ADAPT_STEPS, check_adapt

    try:
        n = int(steps)
    except ValueError:
        raise EdgemetaError(f"adaptation steps must be an integer from 0 (off) to {MAX_ADAPT_STEPS}, got {steps!r}") from None
    try:
        rate = None if lr is None else float(lr)
    except ValueError:
        raise EdgemetaError(f"the adaptation learning rate must be a finite positive number, got {lr!r}") from None
    return check_adapt(n, rate)


def describe_head(h: dict) -> str:
    if h["kind"] == "prototype":
        return "nearest prototype (no adaptation)"
    lr = "the model's learned rates" if h["lr"] is None else f"rate {h['lr']:g}"
    return f"linear head, {h['init']} init, {h['steps']} step(s) at {lr}"


def print_results(results: list[dict], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(results, indent=2))
        return
    for r in results:
        others = ", ".join(f"{t['label']} {100 * t['probability']:.1f}%" for t in r["top"])
        click.echo(f"{r['file']}: {r['label']} (distance {r['distance']:.3g}; {others})")


def print_classes(counts: dict[str, int], backbone: dict, as_json: bool, adapt: dict | None = None) -> None:
    if as_json:
        click.echo(json.dumps({"backbone": backbone, "classes": counts, "adapt": adapt}, indent=2))
        return
    click.echo(f"{len(counts)} class(es), backbone {backbone.get('model')}/{backbone.get('variant')}"
               + (f", head adapted with {adapt['steps']} step(s)" if adapt else ""))
    for name, n in counts.items():
        click.echo(f"  {name}: {n} sample(s)")


# The commands, one module per audience; importing them registers them on `main`.
from edgemeta.cli import board, firmware, fleet, host  # noqa: E402, F401
