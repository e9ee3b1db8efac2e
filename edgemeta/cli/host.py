"""Host commands: train, eval and export need TensorFlow (imported only when they run);
inspect and edgetpu read .tflite files and need none."""

from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import replace
from pathlib import Path

import click

from edgemeta.cli.app import main, seconds, whole
from edgemeta.errors import EdgemetaError
from edgemeta.runtime.heads import PROTOTYPE


def _require_tensorflow() -> None:
    """Import TensorFlow with its C++ start-up chatter (absl/oneDNN lines that no environment
    variable silences in TF 2.21) kept off stderr, and say how to get it when it is missing."""
    if "tensorflow" in sys.modules:
        return
    from edgemeta.quiet import native_stderr_silenced

    try:
        with native_stderr_silenced():
            import keras  # noqa: F401
            import tensorflow  # noqa: F401
    except ImportError as e:
        raise EdgemetaError(f"this command needs TensorFlow, which is not importable ({e}); "
                            "install the host extra: pip install 'edgemeta[host]'") from None


@main.command()
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False), help="Training configuration (TOML).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Model folder to write (and resume from).")
@click.option("--data", default="", help="Dataset location; overrides [data] root (Omniglot: also $EDGEMETA_OMNIGLOT).")
@click.option("--episodes", type=whole(1, 10**8), default=None, help="Override [train] episodes.")
@click.option("--max-minutes", type=seconds(0, 10**6), default=None, help="Override [train] max_minutes (wall-time budget).")
@click.option("--fresh", is_flag=True, help="Ignore an existing checkpoint in --out and start over.")
@click.option("--quiet", is_flag=True, help="No progress display.")
@click.option("--cluster", "cluster_spec", default=None, metavar="HOST:PORT,...",
              help="Train as one worker of this cluster (every worker's host:port, the chief first; writes TF_CONFIG). "
                   "Without it, a TF_CONFIG in the environment is used; without either, one host.")
@click.option("--task-index", type=whole(0, 1023), default=None,
              help="With --cluster: this worker's place in the list, from 0 (the chief).")
def train(config_path: str, out: str, data: str, episodes: int | None, max_minutes: float | None, fresh: bool, quiet: bool,
          cluster_spec: str | None, task_index: int | None) -> None:
    """Meta-train a backbone episodically; resumes from --out's checkpoint when there is one.

    With --cluster (or TF_CONFIG) every worker runs the same command and the cluster trains as one
    (MultiWorkerMirroredStrategy): the chief, worker 0, writes --out; restart every worker to resume.

    \b
    Example:
      edgemeta train --config models/omniglot-vinyals-conv4/config.toml \\
          --data ../shared/data/omniglot --out runs/vinyals --max-minutes 60
      edgemeta train --config models/omniglot-vinyals-conv4/config.toml --data ../shared/data/omniglot \\
          --out runs/vinyals --cluster 10.0.0.1:23456,10.0.0.2:23456 --task-index 0
    """
    from edgemeta.host.cluster import check_port_free, cluster_from_options
    from edgemeta.host.config import load_config, training_data

    cluster = cluster_from_options(cluster_spec, task_index)  # bad input refused before anything is read
    cfg = load_config(config_path)
    if data:
        cfg = replace(cfg, data=replace(cfg.data, root=data))
    overrides = {k: v for k, v in (("episodes", episodes), ("max_minutes", max_minutes)) if v is not None}
    if overrides:
        cfg = replace(cfg, train=replace(cfg.train, **overrides))
    if importlib.util.find_spec("tensorflow") is None:  # on a board: say so before reading any data
        _require_tensorflow()
    prepared = training_data(cfg)  # data and size errors before TensorFlow's slow import
    for note in prepared[3]:
        click.echo(f"note: {note}", err=True)
    if cluster is not None:
        if prepared[0].train.devices:
            raise EdgemetaError("[train] devices cannot be combined with a cluster: each worker trains on all of its "
                                "GPUs (else its CPU); choose them with CUDA_VISIBLE_DEVICES on each worker")
        check_port_free(cluster)
    _require_tensorflow()
    from edgemeta.host.training import train as run_training

    result = run_training(prepared[0], out, progress=not quiet, fresh=fresh, prepared=prepared, cluster=cluster)
    where = f"{cluster.describe()}: " if cluster is not None else ""
    saved = (result.model_note or f"model in {Path(out) / 'model.keras'}") if result.chief else "the chief wrote the model"
    best = (f"best validation accuracy {100 * result.best_val_acc:.2f} +/- {100 * result.best_val_ci95:.2f}% "
            f"at episode {result.best_episode}" if result.best_val_acc >= 0 else "no validation yet")
    click.echo(f"{where}stopped after {result.episodes} episodes ({result.stopped_by}), {result.elapsed_s / 60:.1f} min "
               f"of training in all; {best}; {saved}")


@main.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option("--hosts", required=True, help="Comma-separated workers, the chief first: localhost or ssh destinations ([user@]host).")
@click.option("--port", type=whole(1, 65535), default=23456, show_default=True,
              help="First port; workers on one host take consecutive ports.")
@click.option("--remote-dir", default="", help="Folder to cd into on ssh hosts (the repository or working folder there).")
@click.option("--remote-edgemeta", default="edgemeta", show_default=True,
              help="The edgemeta command on ssh hosts (e.g. .venv/bin/edgemeta).")
@click.argument("train_args", nargs=-1, type=click.UNPROCESSED)
def launch(hosts: str, port: int, remote_dir: str, remote_edgemeta: str, train_args: tuple[str, ...]) -> None:
    """Run `edgemeta train` as a cluster: one worker per host, started here or with plain ssh, with
    --cluster and --task-index filled in; output prefixed [wN]; exit status the worst worker's.

    \b
    Example:
      edgemeta launch --hosts localhost,localhost -- --config models/omniglot-vinyals-conv4/config.toml \\
          --data ../shared/data/omniglot --out runs/vinyals
      edgemeta launch --hosts gpu1,me@gpu2 --remote-dir edgemeta --remote-edgemeta .venv/bin/edgemeta -- \\
          --config models/omniglot-vinyals-conv4/config.toml --data ../shared/data/omniglot --out runs/vinyals
    """
    from edgemeta.host.cluster import launch as run_cluster

    if not train_args:
        raise EdgemetaError("give the train options after --, e.g. -- --config CONFIG --out FOLDER")
    code = run_cluster([h.strip() for h in hosts.split(",")], port, list(train_args), remote_dir, remote_edgemeta,
                       log=lambda m: click.echo(m, err=False))
    sys.exit(code)


@main.command("eval")
@click.option("--model", "model_dir", required=True, type=click.Path(file_okay=False), help="Model folder (from `edgemeta train`).")
@click.option("--data", default="", help="Omniglot location for the model's own split (else $EDGEMETA_OMNIGLOT).")
@click.option("--folder", default="", help="Evaluate on every class of this folder (one sub-folder of images per class) instead.")
@click.option("--split", type=click.Choice(["test", "val"]), default="test", show_default=True, help="Which split of the model's dataset.")
@click.option("--setting", "settings", multiple=True, help="N-way K-shot setting like 5w1s (repeatable). Default: 5w1s 5w5s 20w1s 20w5s.")
@click.option("--episodes", type=whole(1, 10**6), default=1000, show_default=True, help="Seeded episodes per setting.")
@click.option("--query", type=whole(1, 10_000), default=15, show_default=True,
              help="Query images per class (fewer if a class is too small).")
@click.option("--seed", type=whole(0, 2**32 - 1), default=0, show_default=True, help="Episode seed; the same seed gives the same episodes.")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON instead of a table.")
@click.option("--report", type=click.Path(dir_okay=False), default=None, help="Also write a Markdown report here (and .json beside it).")
@click.option("--variant", default=None,
              help="Evaluate an exported .tflite variant (e.g. int8_static) through the runtime instead of Keras.")
@click.option("--confusions", type=whole(0, 10_000), default=0, show_default=True,
              help="Also list the N class pairs (true -> predicted) most often confused in each setting.")
@click.option("--transductive/--non-transductive", default=None,
              help="MAML-style models: normalise queries with their own batch's statistics (the papers' code) or "
                   "with the support set's (edgemeta's default); default: as the model was trained.")
@click.option("--head-only", is_flag=True,
              help="MAML-style models: freeze the body and adapt only the head, as the board does "
                   "(default: the whole network adapts on each support set, host only).")
@click.option("--within-alphabet", is_flag=True,
              help="Omniglot: draw all classes of an episode from one alphabet (look-alike classes, the harder case).")
@click.option("--support-shift", type=whole(0, 1024), default=None,
              help="ProtoNet models: enroll each support sample as the mean of itself and 4 copies moved N pixels "
                   "([method] support_shift; 0: off). Default: the model's. Choose it with --split val.")
def eval_cmd(model_dir: str, data: str, folder: str, split: str, settings: tuple[str, ...], episodes: int, query: int,
             seed: int, as_json: bool, report: str | None, variant: str | None, confusions: int, head_only: bool,
             transductive: bool | None, within_alphabet: bool, support_shift: int | None) -> None:
    """Mean accuracy with 95% confidence intervals over seeded test episodes.

    \b
    Example:
      edgemeta eval --model models/omniglot-vinyals-conv4 --data ../shared/data/omniglot
      edgemeta eval --model models/omniglot-conv4 --folder samples/omniglot --setting 5w1s --json
      edgemeta eval --model models/omniglot-conv4 --data ../shared/data/omniglot --variant int8_static
      edgemeta eval --model models/omniglot-conv4 --data ../shared/data/omniglot --split val --confusions 10
      edgemeta eval --model models/omniglot-conv4 --data ../shared/data/omniglot --within-alphabet
      edgemeta eval --model runs/lake --data ../shared/data/omniglot --split val --support-shift 0
    """
    from edgemeta.host.evaluate import STANDARD_SETTINGS, parse_setting

    if episodes < 1 or query < 1 or confusions < 0:
        raise EdgemetaError("--episodes and --query must be at least 1, --confusions at least 0")
    if within_alphabet and folder:
        raise EdgemetaError("--within-alphabet needs Omniglot's alphabets; a --folder dataset's classes carry none")
    parsed = tuple(parse_setting(s) for s in settings) or STANDARD_SETTINGS
    _require_tensorflow()
    from edgemeta.host.model_eval import evaluate_model_dir

    results, context, text, md = evaluate_model_dir(model_dir, data=data, folder=folder, split=split,
                                                    settings=parsed, episodes=episodes, query=query, seed=seed,
                                                    variant=variant, confusions=confusions, head_only=head_only,
                                                    transductive=transductive, within_alphabet=within_alphabet,
                                                    support_shift=support_shift)
    if report:
        from edgemeta.host.evaluate import results_json
        from edgemeta.host.modeldir import write_atomic, write_json

        write_atomic(Path(report), md)
        write_json(Path(report).with_suffix(".json"), {"context": context, "results": results_json(results)})
    if as_json:
        from edgemeta.host.evaluate import results_json

        click.echo(json.dumps({"context": context, "results": results_json(results)}, indent=2))
    else:
        click.echo(text)
        click.echo(f"\nmeasured with: {context['backend']}")
        if f"{split} classes" in context:  # a folder dataset's: the ones recorded at training (splits.json)
            click.echo(f"data: {context['data']}\n{split} classes ({context['classes']}): {context[f'{split} classes']}")


@main.command()
@click.argument("model_dir", type=click.Path(file_okay=False))
@click.option("--out", default=None, type=click.Path(file_okay=False), help="Where to write the variants (default: MODEL_DIR).")
@click.option("--data", default="", help="Omniglot location (else $EDGEMETA_OMNIGLOT), for calibration and evaluation.")
@click.option("--folder", default="", help="The folder dataset a folder-trained model was trained on.")
@click.option("--episodes", type=whole(1, 10**6), default=1000, show_default=True, help="Evaluation episodes per setting and variant.")
@click.option("--board-head", type=click.Choice(["auto", "own", PROTOTYPE]), default="auto", show_default=True,
              help="Optimization-family models: the board's head, the method's own or the nearest prototype "
                   "(auto: the better on validation episodes).")
def export(model_dir: str, out: str | None, data: str, folder: str, episodes: int, board_head: str) -> None:
    """Write float32, dynamic-range, int8 and static-batch int8 .tflite variants and manifest.json.

    int8 is calibrated on real training images; every variant is evaluated with the standard
    protocol through the TFLite interpreter and gets its own open-set threshold, calibrated on
    validation episodes.

    \b
    Example:
      edgemeta export models/omniglot-conv4 --data ../shared/data/omniglot
    """
    _require_tensorflow()
    from edgemeta.host.export import export_model

    manifest = export_model(model_dir, out, data=data, folder=folder, episodes=episodes, board_head=board_head,
                            log=lambda m: click.echo(m, err=True))
    from edgemeta.host.export import export_report

    click.echo(export_report(manifest))


@main.command()
@click.argument("tflite_file", type=click.Path(dir_okay=False))
@click.option("--board", "board_names", multiple=True, help="Check that this board profile's runtime loads it (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def inspect(tflite_file: str, board_names: tuple[str, ...], as_json: bool) -> None:
    """Ops with versions, tensor types and size of a .tflite file, read without loading it,
    and whether given boards' runtimes can load it (exit status 3 when one cannot).

    \b
    Example:
      edgemeta inspect models/omniglot-conv4/int8_static.tflite --board rpi3b-32bit --board rpi5
    """
    from edgemeta.boards import load_board
    from edgemeta.runtime.tflite_info import read_structure

    s = read_structure(tflite_file)
    checks = {name: load_board(name).check_ops(s.ops) for name in board_names}
    if as_json:
        click.echo(json.dumps({**s.to_dict(), "boards": checks}, indent=2))
    else:
        _print_structure(tflite_file, s)
        for name, problems in checks.items():
            click.echo(f"  board {name}: " + ("loads it" if not problems else "cannot load it: " + "; ".join(problems)))
    if any(checks.values()):
        sys.exit(3)


def _print_structure(tflite_file: str, s) -> None:
    click.echo(f"{tflite_file}: {s.size} bytes ({s.size / 1024:.1f} KiB)")
    for t in s.inputs + s.outputs:
        kind = "input " if t in s.inputs else "output"
        q = f", scale {t.scale:.6g} zero point {t.zero_point}" if t.scale is not None else ""
        click.echo(f"  {kind} {t.name}: {t.dtype} {t.shape}{q}")
    click.echo("  ops: " + ", ".join(f"{k} v{v} (x{s.op_counts[k]})" for k, v in s.ops.items()))
    click.echo("  tensor types: " + ", ".join(f"{k} x{v}" for k, v in s.tensor_types.items()))


@main.command()
@click.argument("model_dir", type=click.Path(file_okay=False))
@click.option("--allow-cpu-ops", is_flag=True, help="Accept a model some of whose ops stay on the CPU.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def edgetpu(model_dir: str, allow_cpu_ops: bool, as_json: bool) -> None:
    """Check that the int8_static variant maps to the Edge TPU, and compile it when edgetpu_compiler is here.

    Without the compiler (it runs on x86-64 Debian/Ubuntu only), a static check of the model's
    quantisation, shapes and ops predicts the mapping and the command says how to compile.

    \b
    Example:
      edgemeta edgetpu models/omniglot-conv4
    """
    from edgemeta.host.edgetpu import INSTALL_HINT, map_model

    out = map_model(model_dir, allow_cpu_ops)
    if as_json:
        click.echo(json.dumps(out, indent=2))
        return
    click.echo(f"{Path(out['model']).name}: {out['tpu_ops']} op(s) on the Edge TPU, {out['cpu_ops']} on the CPU ({out['source']})")
    for p in out["problems"]:
        click.echo(f"  {p}")
    click.echo(f"compiled: {out['compiled']}" if out["compiled"] else f"not compiled: {INSTALL_HINT}")
