"""The `edgemeta` command line. Commands are thin: parse, call the library, print."""

from __future__ import annotations

import json
import os
import sys
import traceback
from dataclasses import replace
from pathlib import Path

import click

from edgemeta.errors import EdgemetaError

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _require_tensorflow() -> None:
    """Import TensorFlow with its C++ start-up chatter (absl/oneDNN lines that no environment
    variable silences in TF 2.21) kept off stderr, and say how to get it when it is missing."""
    if "tensorflow" in sys.modules:
        return
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        import keras  # noqa: F401
        import tensorflow  # noqa: F401
    except ImportError as e:
        raise EdgemetaError(f"this command needs TensorFlow, which is not importable ({e}); "
                            "install the host extra: pip install 'edgemeta[host]'") from None
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


class _Group(click.Group):
    """Turns library errors into one line and an exit status, with the traceback behind --debug."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except EdgemetaError as e:
            if ctx.obj and ctx.obj.get("debug"):
                traceback.print_exc()
            click.echo(f"error: {e}", err=True)
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


@main.command()
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False), help="Training configuration (TOML).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Model folder to write (and resume from).")
@click.option("--data", default="", help="Dataset location; overrides [data] root (Omniglot: also $EDGEMETA_OMNIGLOT).")
@click.option("--episodes", type=int, default=None, help="Override [train] episodes.")
@click.option("--max-minutes", type=float, default=None, help="Override [train] max_minutes (wall-time budget).")
@click.option("--fresh", is_flag=True, help="Ignore an existing checkpoint in --out and start over.")
@click.option("--quiet", is_flag=True, help="No progress display.")
def train(config_path: str, out: str, data: str, episodes: int | None, max_minutes: float | None, fresh: bool, quiet: bool) -> None:
    """Meta-train a backbone episodically; resumes from --out's checkpoint when there is one.

    \b
    Example:
      edgemeta train --config models/omniglot-vinyals-conv4/config.toml \\
          --data ../shared/data/omniglot --out runs/vinyals --max-minutes 60
    """
    from edgemeta.config import load_config

    cfg = load_config(config_path)
    _require_tensorflow()
    from edgemeta.train import train as run_training

    if data:
        cfg = replace(cfg, data=replace(cfg.data, root=data))
    overrides = {k: v for k, v in (("episodes", episodes), ("max_minutes", max_minutes)) if v is not None}
    if overrides:
        cfg = replace(cfg, train=replace(cfg.train, **overrides))
    result = run_training(cfg, out, progress=not quiet, fresh=fresh)
    click.echo(f"stopped after {result.episodes} episodes ({result.stopped_by}), {result.elapsed_s / 60:.1f} min; "
               f"best validation accuracy {100 * result.best_val_acc:.2f} +/- {100 * result.best_val_ci95:.2f}% "
               f"at episode {result.best_episode}; model in {Path(out) / 'model.keras'}")


@main.command("eval")
@click.option("--model", "model_dir", required=True, type=click.Path(file_okay=False), help="Model folder (from `edgemeta train`).")
@click.option("--data", default="", help="Omniglot location for the model's own split (else $EDGEMETA_OMNIGLOT).")
@click.option("--folder", default="", help="Evaluate on every class of this folder (one sub-folder of images per class) instead.")
@click.option("--split", type=click.Choice(["test", "val"]), default="test", show_default=True, help="Which split of the model's dataset.")
@click.option("--setting", "settings", multiple=True, help="N-way K-shot setting like 5w1s (repeatable). Default: 5w1s 5w5s 20w1s 20w5s.")
@click.option("--episodes", type=int, default=1000, show_default=True, help="Seeded episodes per setting.")
@click.option("--query", type=int, default=15, show_default=True, help="Query images per class (fewer if a class is too small).")
@click.option("--seed", type=int, default=0, show_default=True, help="Episode seed; the same seed gives the same episodes.")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON instead of a table.")
@click.option("--report", type=click.Path(dir_okay=False), default=None, help="Also write a Markdown report here (and .json beside it).")
def eval_cmd(model_dir: str, data: str, folder: str, split: str, settings: tuple[str, ...], episodes: int, query: int,
             seed: int, as_json: bool, report: str | None) -> None:
    """Mean accuracy with 95% confidence intervals over seeded test episodes.

    \b
    Example:
      edgemeta eval --model models/omniglot-vinyals-conv4 --data ../shared/data/omniglot
      edgemeta eval --model models/omniglot-conv4 --folder samples/omniglot --setting 5w1s --json
    """
    from edgemeta.evaluate import STANDARD_SETTINGS, parse_setting

    if episodes < 1 or query < 1:
        raise EdgemetaError("--episodes and --query must be at least 1")
    parsed = tuple(parse_setting(s) for s in settings) or STANDARD_SETTINGS
    _require_tensorflow()
    from edgemeta.host import evaluate_model_dir

    results, context, text, md = evaluate_model_dir(model_dir, data=data, folder=folder, split=split,
                                                    settings=parsed, episodes=episodes, query=query, seed=seed)
    if report:
        from edgemeta.evaluate import results_json
        from edgemeta.modeldir import write_atomic, write_json

        write_atomic(Path(report), md)
        write_json(Path(report).with_suffix(".json"), {"context": context, "results": results_json(results)})
    if as_json:
        from edgemeta.evaluate import results_json

        click.echo(json.dumps({"context": context, "results": results_json(results)}, indent=2))
    else:
        click.echo(text)
