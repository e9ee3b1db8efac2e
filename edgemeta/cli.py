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
    from edgemeta.quiet import native_stderr_silenced

    try:
        with native_stderr_silenced():
            import keras  # noqa: F401
            import tensorflow  # noqa: F401
    except ImportError as e:
        raise EdgemetaError(f"this command needs TensorFlow, which is not importable ({e}); "
                            "install the host extra: pip install 'edgemeta[host]'") from None


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
@click.option("--variant", default=None,
              help="Evaluate an exported .tflite variant (e.g. int8_static) through the runtime instead of Keras.")
@click.option("--confusions", type=int, default=0, show_default=True,
              help="Also list the N class pairs (true -> predicted) most often confused in each setting.")
@click.option("--head-only", is_flag=True,
              help="MAML-style models: freeze the body and adapt only the head, as the board does "
                   "(default: the whole network adapts on each support set, host only).")
def eval_cmd(model_dir: str, data: str, folder: str, split: str, settings: tuple[str, ...], episodes: int, query: int,
             seed: int, as_json: bool, report: str | None, variant: str | None, confusions: int, head_only: bool) -> None:
    """Mean accuracy with 95% confidence intervals over seeded test episodes.

    \b
    Example:
      edgemeta eval --model models/omniglot-vinyals-conv4 --data ../shared/data/omniglot
      edgemeta eval --model models/omniglot-conv4 --folder samples/omniglot --setting 5w1s --json
      edgemeta eval --model models/omniglot-conv4 --data ../shared/data/omniglot --variant int8_static
      edgemeta eval --model models/omniglot-conv4 --data ../shared/data/omniglot --split val --confusions 10
    """
    from edgemeta.evaluate import STANDARD_SETTINGS, parse_setting

    if episodes < 1 or query < 1 or confusions < 0:
        raise EdgemetaError("--episodes and --query must be at least 1, --confusions at least 0")
    parsed = tuple(parse_setting(s) for s in settings) or STANDARD_SETTINGS
    _require_tensorflow()
    from edgemeta.host import evaluate_model_dir

    results, context, text, md = evaluate_model_dir(model_dir, data=data, folder=folder, split=split,
                                                    settings=parsed, episodes=episodes, query=query, seed=seed,
                                                    variant=variant, confusions=confusions, head_only=head_only)
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
        click.echo(f"\nmeasured with: {context['backend']}")


@main.command()
@click.argument("model_dir", type=click.Path(file_okay=False))
@click.option("--out", default=None, type=click.Path(file_okay=False), help="Where to write the variants (default: MODEL_DIR).")
@click.option("--data", default="", help="Omniglot location (else $EDGEMETA_OMNIGLOT), for calibration and evaluation.")
@click.option("--folder", default="", help="The folder dataset a folder-trained model was trained on.")
@click.option("--episodes", type=int, default=1000, show_default=True, help="Evaluation episodes per setting and variant.")
def export(model_dir: str, out: str | None, data: str, folder: str, episodes: int) -> None:
    """Write float32, dynamic-range, int8 and static-batch int8 .tflite variants and manifest.json.

    int8 is calibrated on real training images; every variant is evaluated with the standard
    protocol through the TFLite interpreter and gets its own open-set threshold, calibrated on
    validation episodes.

    \b
    Example:
      edgemeta export models/omniglot-conv4 --data ../shared/data/omniglot
    """
    _require_tensorflow()
    from edgemeta.export import export_model

    manifest = export_model(model_dir, out, data=data, folder=folder, episodes=episodes, log=lambda m: click.echo(m, err=True))
    from edgemeta.export import export_report

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


def _runtime(model: str | None, store: str, variant: str | None, threads: int, edgetpu: str | None, xnnpack: bool = True):
    """The runtime for a store: --model, else $EDGEMETA_MODEL, else the model the store was enrolled with."""
    from edgemeta.runtime.classifier import FewShotRuntime
    from edgemeta.runtime.store import EnrollmentStore

    model = model or os.environ.get("EDGEMETA_MODEL")
    if not model and EnrollmentStore.exists(store):
        model = EnrollmentStore.open(store).backbone.get("model_path")
        variant = variant or EnrollmentStore.open(store).backbone.get("variant")
    if not model:
        raise EdgemetaError("which model? pass --model DIR (an exported model folder with manifest.json) or set $EDGEMETA_MODEL")
    return FewShotRuntime(model, variant=variant, threads=threads, edgetpu=edgetpu, xnnpack=xnnpack)


def _runtime_options(f):
    f = click.option("--xnnpack/--no-xnnpack", default=True, show_default=True, help="Use LiteRT's XNNPACK CPU delegate.")(f)
    f = click.option("--edgetpu", default=None, metavar="DEVICE",
                     help="Run on the Edge TPU delegate: usb, usb:0, pci, or '' for the first.")(f)
    f = click.option("--threads", type=int, default=1, show_default=True, help="Interpreter threads.")(f)
    f = click.option("--variant", default=None, help="Model variant (default: the manifest's, int8_static).")(f)
    f = click.option("--model", default=None, type=click.Path(file_okay=False),
                     help="Exported model folder (default: $EDGEMETA_MODEL or the store's).")(f)
    return click.option("--store", required=True, type=click.Path(), help="Enrollment store folder.")(f)


def _adapt_setting(steps: str, lr: str | None) -> tuple[int, float | None]:
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


def _describe_head(h: dict) -> str:
    if h["kind"] == "prototype":
        return "nearest prototype (no adaptation)"
    lr = "the model's learned rates" if h["lr"] is None else f"rate {h['lr']:g}"
    return f"linear head, {h['init']} init, {h['steps']} step(s) at {lr}"


@main.command()
@_runtime_options
@click.option("--label", required=True, help="The class these samples show.")
@click.option("--keep-samples", is_flag=True, help="Also keep the samples (new stores only), for re-enrollment after a model upgrade.")
@click.option("--adapt", "adapt_steps", default=None, metavar="STEPS",
              help="Also set the store's head adaptation (as `edgemeta adapt --steps`).")
@click.option("--lr", default=None, metavar="RATE", help="With --adapt: its learning rate (as `edgemeta adapt --lr`).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.argument("files", nargs=-1, required=True, type=click.Path())
def enroll(store: str, model: str | None, variant: str | None, threads: int, edgetpu: str | None, xnnpack: bool, label: str,
           keep_samples: bool, adapt_steps: str | None, lr: str | None, as_json: bool, files: tuple[str, ...]) -> None:
    """Teach the board a class from a few samples (images or .npy arrays).

    \b
    Example:
      edgemeta enroll --store ~/store --model models/omniglot-conv4 --label alpha a1.png a2.png
      edgemeta enroll --store ~/store --label beta --adapt 10 b1.png b2.png b3.png
    """
    if lr is not None and adapt_steps is None:
        raise EdgemetaError("--lr goes with --adapt STEPS")
    adapt = _adapt_setting(adapt_steps, lr) if adapt_steps is not None else None
    rt = _runtime(model, store, variant, threads, edgetpu, xnnpack)
    count = rt.enroll(store, label, list(files), keep_samples=keep_samples, adapt=adapt)
    if as_json:
        click.echo(json.dumps({"label": label.strip(), "samples": count}))
    else:
        click.echo(f"enrolled {len(files)} file(s) as {label.strip()!r}; it now has {count} sample(s)")


@main.command()
@_runtime_options
@click.option("--top-k", type=int, default=1, show_default=True, help="How many nearest classes to list.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.argument("files", nargs=-1, required=True, type=click.Path())
def classify(store: str, model: str | None, variant: str | None, threads: int, edgetpu: str | None, xnnpack: bool, top_k: int,
             as_json: bool, files: tuple[str, ...]) -> None:
    """Name the class of each image, or 'unknown' when no enrolled class is near enough.

    \b
    Example:
      edgemeta classify --store ~/store --top-k 3 query.png
    """
    rt = _runtime(model, store, variant, threads, edgetpu, xnnpack)
    _print_results(rt.classify(store, list(files), top_k=top_k), as_json)


def _print_results(results: list[dict], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(results, indent=2))
        return
    for r in results:
        others = ", ".join(f"{t['label']} {100 * t['probability']:.1f}%" for t in r["top"])
        click.echo(f"{r['file']}: {r['label']} (distance {r['distance']:.3g}; {others})")


def _print_classes(counts: dict[str, int], backbone: dict, as_json: bool, adapt: dict | None = None) -> None:
    if as_json:
        click.echo(json.dumps({"backbone": backbone, "classes": counts, "adapt": adapt}, indent=2))
        return
    click.echo(f"{len(counts)} class(es), backbone {backbone.get('model')}/{backbone.get('variant')}"
               + (f", head adapted with {adapt['steps']} step(s)" if adapt else ""))
    for name, n in counts.items():
        click.echo(f"  {name}: {n} sample(s)")


def _store_change(store: str, change):
    from edgemeta.runtime.store import EnrollmentStore

    EnrollmentStore.open(store)  # a clear error before a lock file is created in a wrong folder
    with EnrollmentStore.locked(store):
        s = EnrollmentStore.open(store)
        result = change(s)
        s.save()
    return result


@main.command()
@click.option("--store", required=True, type=click.Path(), help="Enrollment store folder.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def classes(store: str, as_json: bool) -> None:
    """List the enrolled classes with their sample counts."""
    from edgemeta.runtime.store import EnrollmentStore

    s = EnrollmentStore.open(store)
    _print_classes(s.counts(), s.backbone, as_json, s.adapt)


@main.command()
@click.option("--store", required=True, type=click.Path(), help="Enrollment store folder.")
@click.option("--label", required=True, help="The class to forget.")
def forget(store: str, label: str) -> None:
    """Remove a class and its samples from the store."""
    n = _store_change(store, lambda s: s.forget(label))
    click.echo(f"forgot {label!r} ({n} sample(s))")


@main.command()
@click.option("--store", required=True, type=click.Path(), help="Enrollment store folder.")
@click.argument("old")
@click.argument("new")
def rename(store: str, old: str, new: str) -> None:
    """Rename a class."""
    _store_change(store, lambda s: s.rename(old, new))
    click.echo(f"renamed {old!r} to {new.strip()!r}")


@main.command()
@_runtime_options
@click.option("--steps", required=True, metavar="N", help="Gradient steps (0 to 1000; 0 turns adaptation off).")
@click.option("--lr", default=None, metavar="RATE",
              help="Learning rate (default: a linear-head model's learned rates; prototype models 0.01).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def adapt(store: str, model: str | None, variant: str | None, threads: int, edgetpu: str | None, xnnpack: bool, steps: str,
          lr: str | None, as_json: bool) -> None:
    """Classify a store with a linear head adapted by a few gradient steps on its samples.

    Prototype models start from the prototypes (proto-MAML), linear-head models from their
    meta-learned head. The adapted head is saved with the store and recomputed on every change
    (enroll, forget, rename, reenroll); `--steps 0` goes back to the model's own head.

    \b
    Example:
      edgemeta adapt --store ~/store --model models/omniglot-conv4 --steps 10
    """
    setting = _adapt_setting(steps, lr)
    rt = _runtime(model, store, variant, threads, edgetpu, xnnpack)
    head = rt.adapt(store, *setting)
    click.echo(json.dumps(head) if as_json else f"store {store}: {_describe_head(head)}")


@main.command()
@_runtime_options
def reenroll(store: str, model: str | None, variant: str | None, threads: int, edgetpu: str | None, xnnpack: bool) -> None:
    """Re-embed a store's kept samples with a new model (after an upgrade)."""
    if not model and not os.environ.get("EDGEMETA_MODEL"):
        raise EdgemetaError("pass --model with the new model folder to re-enroll with")
    rt = _runtime(model, store, variant, threads, edgetpu, xnnpack)
    n = rt.reenroll(store)
    click.echo(f"re-enrolled {n} sample(s) with {rt.backbone['model']}/{rt.backbone['variant']}")


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
    from edgemeta.edgetpu import INSTALL_HINT, compile_model, static_check
    from edgemeta.runtime.manifest import read_manifest

    manifest = read_manifest(model_dir)
    source = manifest.model_path("int8_static")
    report = static_check(source)
    compiled = None
    if not report.fully_mapped and not allow_cpu_ops:
        raise EdgemetaError(f"{source.name} would not map fully to the Edge TPU: {'; '.join(report.problems)}")
    import shutil

    if shutil.which("edgetpu_compiler"):
        compiled, report = compile_model(source, manifest.folder, allow_cpu_ops=allow_cpu_ops)
        from edgemeta.export import add_variant

        add_variant(manifest.folder, "edgetpu", compiled, quantization="int8", static_batch=1,
                    based_on="int8_static", extra={"edgetpu_ops": report.tpu_ops, "cpu_ops": report.cpu_ops})
    out = {"model": str(source), "source": report.source, "tpu_ops": report.tpu_ops, "cpu_ops": report.cpu_ops,
           "problems": report.problems, "compiled": str(compiled) if compiled else None}
    if as_json:
        click.echo(json.dumps(out, indent=2))
        return
    click.echo(f"{source.name}: {report.tpu_ops} op(s) on the Edge TPU, {report.cpu_ops} on the CPU ({report.source})")
    for p in report.problems:
        click.echo(f"  {p}")
    click.echo(f"compiled: {compiled}" if compiled else f"not compiled: {INSTALL_HINT}")


@main.command()
@click.option("--model", default="models/omniglot-conv4", show_default=True, type=click.Path(file_okay=False),
              help="Exported model folder.")
@click.option("--samples", default="samples/omniglot", show_default=True, type=click.Path(file_okay=False),
              help="Folder with one sub-folder of images per class.")
@click.option("--way", type=int, default=20, show_default=True, help="Classes enrolled per episode.")
@click.option("--shot", type=int, default=1, show_default=True, help="Samples enrolled per class.")
@click.option("--episodes", type=int, default=10, show_default=True, help="Seeded episodes.")
@click.option("--variant", default=None, help="Model variant (default: the manifest's, int8_static).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable summary.")
def demo(model: str, samples: str, way: int, shot: int, episodes: int, variant: str | None, as_json: bool) -> None:
    """Enroll characters the model never saw from one drawing each, classify the rest, with timings.

    Runs on the board runtime only (no TensorFlow), through real enrollment stores on disk.

    \b
    Example:
      edgemeta demo --model models/omniglot-conv4 --samples samples/omniglot --way 20 --shot 1
    """
    from edgemeta.demo import run_demo

    if way < 2 or shot < 1 or episodes < 1:
        raise EdgemetaError("--way must be at least 2, --shot and --episodes at least 1")
    s = run_demo(model, samples, way, shot, episodes, variant=variant, log=(lambda m: None) if as_json else click.echo)
    if as_json:
        click.echo(json.dumps(s, indent=2))
        return
    ci = f" +/- {s['ci95']:.1f}" if s["ci95"] is not None else ""
    click.echo(f"\n{s['way']}-way {s['shot']}-shot on unseen characters: accuracy {s['accuracy']:.1f}{ci}% "
               f"over {s['episodes']} episodes ({s['queries']} drawings); {s['answered_known']:.0f}% answered as known")
    click.echo(f"timings: model load {s['model_load_ms']:.0f} ms, enroll {s['enroll_ms_per_class']:.1f} ms per class, "
               f"classify {s['classify_ms_per_image']:.2f} ms per image ({s['runtime']}, {s['variant']})")


@main.group(invoke_without_command=True)
@click.pass_context
def boards(ctx: click.Context) -> None:
    """List the board profiles (boards/*.toml); `edgemeta boards show NAME` explains one."""
    if ctx.invoked_subcommand:
        return
    from edgemeta.boards import list_boards

    for b in list_boards():
        note = "" if b.supported else "  (not supported: " + b.raw.get("unsupported_reason", "") + ")"
        click.echo(f"{b.name:22s} {b.title:48s} {b.raw['arch']:8s} {b.runtime['package']} {b.runtime['version']}, "
                   f"{b.variant}{note}")


@boards.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def boards_show(name: str, as_json: bool) -> None:
    """Everything a profile says about one board."""
    from edgemeta.boards import load_board

    b = load_board(name)
    if as_json:
        click.echo(json.dumps({"name": b.name, **b.raw, "max_op_versions": b.max_op_versions()}, indent=2))
        return
    r = b.raw
    click.echo(f"{b.name}: {b.title}")
    click.echo(f"  system   {r['arch']}, {r['os']}, Python {r['python']}, glibc {r.get('glibc', '?')}, {r.get('memory_mb', '?')} MB, "
               f"{r.get('cpu', '')}")
    rt = b.runtime
    click.echo(f"  runtime  {rt['package']}=={rt['version']} (import {rt['module']}), wheels {', '.join(rt['wheel_platforms'])}, "
               f"{rt.get('numpy', '')}")
    limits = b.max_op_versions()
    click.echo("  ops      " + (", ".join(f"{k}<=v{v}" for k, v in limits.items()) if limits else "every op version TF 2.21 writes"))
    d = r.get("delegate", {})
    click.echo(f"  delegate {d.get('name', 'none')}" + (f" ({d['library']}, device {d.get('device', '')})" if "library" in d else "")
               + f", {r.get('threads', 1)} threads")
    click.echo(f"  model    {b.variant} (accepts {', '.join(r['model'].get('accepts', [b.variant]))})")
    s = r.get("serial", {})
    click.echo(f"  serial   {s.get('device', '-')} at {s.get('baud', '-')} baud")
    if not b.supported:
        click.echo(f"  NOT SUPPORTED: {r.get('unsupported_reason', '')}")


@main.command()
@click.option("--model", required=True, type=click.Path(file_okay=False), help="Exported model folder.")
@click.option("--store", default=None, type=click.Path(), help="Also check this enrollment store fits the model.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def health(model: str, store: str | None, as_json: bool) -> None:
    """Load the model and embed a sample: the check deploy runs on a board after installing a release."""
    import time

    import numpy as np

    from edgemeta.runtime.classifier import FewShotRuntime
    from edgemeta.runtime.store import EnrollmentStore

    t = time.perf_counter()
    rt = FewShotRuntime(model)
    emb = rt.embedder(np.full((1, *rt.manifest.preprocess.input_shape), 128, np.uint8))
    if emb.shape != (1, rt.manifest.embedding_dim) or not np.isfinite(emb).all():
        raise EdgemetaError(f"{model}: the model gives a bad embedding {emb.shape}")
    out = {"model": rt.manifest.name, "variant": rt.variant.name, "runtime": rt.embedder.runtime,
           "ms": round(1000 * (time.perf_counter() - t), 1), "store": None}
    if store and EnrollmentStore.exists(store):
        s = EnrollmentStore.open(store)
        out["store"] = {"classes": len(s.class_names), "matches_model": s.backbone.get("sha256") == rt.variant.sha256}
    if as_json:
        click.echo(json.dumps(out))
    else:
        click.echo(f"ok: {out['model']}/{out['variant']} on {out['runtime']} loaded and embedded in {out['ms']} ms"
                   + (f"; store has {out['store']['classes']} classes"
                      + ("" if out["store"]["matches_model"] else " enrolled with another model (run edgemeta reenroll)")
                      if out["store"] else ""))


@main.command()
@click.option("--board", required=True, help="Board profile (see `edgemeta boards`).")
@click.option("--model", required=True, type=click.Path(file_okay=False), help="Exported model folder.")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Bundle folder to write: new, empty, or an earlier bundle (replaced once the new one is built).")
@click.option("--wheelhouse", is_flag=True, help="Include every wheel for the board's platform (offline install).")
def bundle(board: str, model: str, out: str, wheelhouse: bool) -> None:
    """Build a checksummed release of a model for one board; refuses a model the board cannot run.

    \b
    Example:
      edgemeta bundle --board rpi5 --model models/omniglot-conv4 --out dist/rpi5 --wheelhouse
    """
    from edgemeta.deploy.bundle import build_bundle

    path = build_bundle(board, model, out, wheelhouse=wheelhouse)
    n = sum(1 for p in path.rglob("*") if p.is_file())
    click.echo(f"bundle for {board} written to {path} ({n} files)")


@main.command()
@click.option("--board", default=None, help="Board profile; builds the bundle from --model.")
@click.option("--model", default=None, type=click.Path(file_okay=False), help="Exported model folder (with --board).")
@click.option("--bundle", "bundle_dir", default=None, type=click.Path(file_okay=False), help="A bundle already built.")
@click.option("--host", "hosts", multiple=True, help="user@host or an ~/.ssh/config alias (repeatable).")
@click.option("--hosts", "hosts_file", default=None, type=click.Path(dir_okay=False), help="File with one host per line.")
@click.option("--ssh-config", default=None, type=click.Path(dir_okay=False), help="ssh -F FILE (default: ~/.ssh/config).")
@click.option("--parallel", type=int, default=4, show_default=True, help="Hosts deployed at once.")
@click.option("--wheelhouse", is_flag=True, help="Ship every wheel with the bundle: boards install offline.")
@click.option("--dry-run", is_flag=True, help="Check the hosts and say what would happen; change nothing.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable per-host results.")
def deploy(board: str | None, model: str | None, bundle_dir: str | None, hosts: tuple[str, ...], hosts_file: str | None,
           ssh_config: str | None, parallel: int, wheelhouse: bool, dry_run: bool, as_json: bool) -> None:
    """Deploy a model to boards over SSH: verify, install, health-check, activate atomically, roll back on failure.

    \b
    Example:
      edgemeta deploy --board rpi5 --model models/omniglot-conv4 --host pi@kitchen --host pi@garage
      edgemeta deploy --bundle dist/rpi5 --hosts fleet.txt --parallel 8
    """
    import tempfile

    from edgemeta.deploy.bundle import build_bundle
    from edgemeta.deploy.ssh import deploy_fleet, read_hosts_file

    targets = list(hosts) + (read_hosts_file(hosts_file) if hosts_file else [])
    if not targets:
        raise EdgemetaError("no hosts given: pass --host user@board (repeatable) or --hosts FILE")
    with tempfile.TemporaryDirectory() as tmp:
        if bundle_dir:
            path = Path(bundle_dir)
        elif board and model:
            path = build_bundle(board, model, Path(tmp) / "bundle", wheelhouse=wheelhouse)
        else:
            raise EdgemetaError("pass --bundle DIR, or --board NAME with --model DIR")
        results = deploy_fleet(targets, path, ssh_config, dry_run, parallel,
                               log=(lambda h, m: None) if as_json else (lambda h, m: click.echo(f"{h}: {m}", err=True)))
    if as_json:
        click.echo(json.dumps([r.__dict__ for r in results], indent=2))
    else:
        width = max(len(r.host) for r in results)
        click.echo(f"{'host':{width}}  result  release / error")
        for r in results:
            click.echo(f"{r.host:{width}}  {'ok' if r.ok else 'FAILED':6}  {r.release if r.ok else r.error}")
    if not all(r.ok for r in results):
        sys.exit(1)


@main.command()
@click.option("--host", "hosts", multiple=True, required=True, help="user@host or an ~/.ssh/config alias (repeatable).")
@click.option("--ssh-config", default=None, type=click.Path(dir_okay=False), help="ssh -F FILE.")
def rollback(hosts: tuple[str, ...], ssh_config: str | None) -> None:
    """Switch boards back to their previous release."""
    from edgemeta.deploy.ssh import rollback_host

    failed = False
    for h in hosts:
        try:
            r = rollback_host(h, ssh_config)
            click.echo(f"{h}: active {r['active']} (was {r['rolled_back_from']})")
        except EdgemetaError as e:
            click.echo(f"{h}: FAILED {e}", err=True)
            failed = True
    if failed:
        sys.exit(1)


@main.command()
@click.option("--model", required=True, type=click.Path(file_okay=False), help="Exported model folder.")
@click.option("--store", required=True, type=click.Path(), help="Enrollment store folder.")
@click.option("--socket", "unix_path", default=None, help="Listen on this Unix socket.")
@click.option("--tcp", default=None, metavar="HOST:PORT", help="Listen on TCP (use 127.0.0.1 unless the network is trusted).")
@click.option("--serial", "serial_device", default=None, help="Also answer framed requests on this serial port.")
@click.option("--baud", type=int, default=115200, show_default=True, help="Serial speed.")
@click.option("--stdio", is_flag=True, help="Answer JSON lines on stdin/stdout (what `remote --via ssh:` uses).")
@click.option("--threads", type=int, default=1, show_default=True, help="Interpreter threads.")
@click.option("--edgetpu", default=None, metavar="DEVICE", help="Run on the Edge TPU delegate.")
def serve(model: str, store: str, unix_path: str | None, tcp: str | None, serial_device: str | None, baud: int, stdio: bool,
          threads: int, edgetpu: str | None) -> None:
    """The board agent: keeps the model and store loaded and answers enroll, classify, classes,
    forget, rename, adapt and status requests (JSON lines on a socket or stdio; framed on a serial port).

    \b
    Example:
      edgemeta serve --model /opt/edgemeta/current/model --store /opt/edgemeta/store --socket /run/edgemeta.sock --serial /dev/serial0
    """
    import signal
    import threading

    from edgemeta.runtime.agent import Agent, make_server, serve_serial, serve_stdio

    if not (unix_path or tcp or serial_device or stdio):
        raise EdgemetaError("say where to listen: --socket PATH, --tcp HOST:PORT, --serial DEVICE or --stdio")
    agent = Agent(model, store, threads=threads, edgetpu=edgetpu)
    if stdio:
        serve_stdio(agent, sys.stdin.buffer, sys.stdout.buffer)
        return
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    server = make_server(agent, unix_path, tcp) if (unix_path or tcp) else None
    threads_ = []
    if server:
        threads_.append(threading.Thread(target=server.serve_forever, daemon=True))
    if serial_device:
        threads_.append(threading.Thread(target=serve_serial, args=(agent, serial_device, baud, stop), daemon=True))
    for t in threads_:
        t.start()
    where = ", ".join(x for x in (unix_path, tcp, serial_device and f"{serial_device}@{baud}") if x)
    click.echo(f"serving {agent.rt.manifest.name}/{agent.rt.variant.name} on {where}", err=True)
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    if server:
        server.shutdown()
        server.server_close()
        if unix_path:
            Path(unix_path).unlink(missing_ok=True)


@main.group()
@click.option("--via", required=True, help="unix:PATH, tcp:HOST:PORT, ssh:USER@HOST (the deployed release) or serial:DEVICE[@BAUD].")
@click.option("--ssh-config", default=None, type=click.Path(dir_okay=False), help="ssh -F FILE.")
@click.option("--timeout", type=float, default=30.0, show_default=True, help="Seconds to wait for an answer.")
@click.pass_context
def remote(ctx: click.Context, via: str, ssh_config: str | None, timeout: float) -> None:
    """Run enroll, classify, classes, forget, rename, adapt or status on a board.

    \b
    Example:
      edgemeta remote --via ssh:pi@kitchen enroll --label mug mug1.jpg mug2.jpg
      edgemeta remote --via serial:/dev/ttyUSB0 classify --top-k 3 cup.jpg
    """
    ctx.obj.update(via=via, ssh_config=ssh_config, timeout=timeout)


def _remote_call(op: str, args: dict, files: tuple[str, ...] = ()) -> dict:
    from edgemeta.runtime.agent import connect

    obj = click.get_current_context().obj
    attachments = []
    for f in files:
        try:
            attachments.append(Path(f).read_bytes())
        except OSError as e:
            raise EdgemetaError(f"cannot read {f}: {e.strerror}") from None
    client = connect(obj["via"], obj["ssh_config"], obj["timeout"])
    try:
        return client.request(op, args, attachments)
    finally:
        client.close()


@remote.command("enroll")
@click.option("--label", required=True, help="The class these samples show.")
@click.argument("files", nargs=-1, required=True, type=click.Path())
def remote_enroll(label: str, files: tuple[str, ...]) -> None:
    """Enroll image files (sent to the board) as a class."""
    r = _remote_call("enroll", {"label": label}, files)
    click.echo(f"enrolled {len(files)} file(s) as {r['label']!r}; it now has {r['samples']} sample(s)")


@remote.command("classify")
@click.option("--top-k", type=int, default=1, show_default=True, help="How many nearest classes to list.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.argument("files", nargs=-1, required=True, type=click.Path())
def remote_classify(top_k: int, as_json: bool, files: tuple[str, ...]) -> None:
    """Classify image files on the board."""
    results = _remote_call("classify", {"top_k": top_k}, files)["results"]
    for f, r in zip(files, results, strict=True):
        r["file"] = f
    _print_results(results, as_json)


@remote.command("classes")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def remote_classes(as_json: bool) -> None:
    """List the board's enrolled classes."""
    r = _remote_call("classes", {})
    _print_classes(r["classes"], r["backbone"], as_json, (r.get("head") or {}).get("adapt"))


@remote.command("forget")
@click.option("--label", required=True, help="The class to forget.")
def remote_forget(label: str) -> None:
    """Remove a class on the board."""
    r = _remote_call("forget", {"label": label})
    click.echo(f"forgot {label!r} ({r['removed']} sample(s))")


@remote.command("rename")
@click.argument("old")
@click.argument("new")
def remote_rename(old: str, new: str) -> None:
    """Rename a class on the board."""
    _remote_call("rename", {"old": old, "new": new})
    click.echo(f"renamed {old!r} to {new.strip()!r}")


@remote.command("adapt")
@click.option("--steps", required=True, metavar="N", help="Gradient steps (0 to 1000; 0 turns adaptation off).")
@click.option("--lr", default=None, metavar="RATE", help="Learning rate (default: as `edgemeta adapt`).")
def remote_adapt(steps: str, lr: str | None) -> None:
    """Set the board store's head adaptation (as `edgemeta adapt`)."""
    n, rate = _adapt_setting(steps, lr)
    click.echo(f"board store: {_describe_head(_remote_call('adapt', {'steps': n, 'lr': rate}))}")


@remote.command("status")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def remote_status(as_json: bool) -> None:
    """The agent's model, runtime and store."""
    r = _remote_call("status", {})
    click.echo(json.dumps(r, indent=2) if as_json else
               f"{r['model']}/{r['variant']} on {r['runtime']}: {r['classes']} class(es), {r['requests']} request(s), up {r['uptime_s']} s")


@main.command()
@click.option("--board", default=None, help="Check against this board profile (runtime, delegate, serial).")
@click.option("--host", default=None, help="Run the checks on this board over ssh (before or after deploy).")
@click.option("--ssh-config", default=None, type=click.Path(dir_okay=False), help="ssh -F FILE.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def doctor(board: str | None, host: str | None, ssh_config: str | None, as_json: bool) -> None:
    """Check a board: Python, architecture, glibc, interpreter, numpy, Edge TPU library and USB ids,
    groups, disk, memory, serial port. Each check passes or fails with its fix; exit 1 on a failure.

    \b
    Example:
      edgemeta doctor --board rpi5                       # on the board
      edgemeta doctor --board rpi5 --host pi@kitchen     # from the host, over ssh
    """
    from edgemeta import doctor as doc

    profile = None
    if board:
        from edgemeta.boards import load_board

        profile = load_board(board).raw
    if host:
        import shlex

        from edgemeta.deploy.ssh import Remote

        remote = Remote(host, ssh_config)
        args = ["--json"] + (["--profile-json", json.dumps(profile)] if profile else [])
        p = remote.run('R="${EDGEMETA_ROOT:-$HOME/.edgemeta}"; P=python3; [ -x "$R/current/venv/bin/python" ] && '
                       'P="$R/current/venv/bin/python"; exec "$P" - ' + shlex.join(args), input=Path(doc.__file__).read_bytes())
        if p.returncode == 255:
            raise EdgemetaError(f"ssh to {host} failed: {p.stderr.decode(errors='replace').strip().splitlines()[-1:]}")
        try:
            checks = json.loads(p.stdout.decode().strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise EdgemetaError(f"doctor on {host} gave no answer: {p.stderr.decode(errors='replace')[-300:]}") from None
    else:
        checks = doc.run_checks(profile)
    click.echo(json.dumps(checks, indent=2) if as_json else doc.format_checks(checks))
    if any(c["status"] == "fail" for c in checks):
        sys.exit(1)


@main.command()
@click.argument("boot", type=click.Path(file_okay=False, exists=True))
@click.option("--hostname", required=True, help="The board's hostname.")
@click.option("--user", required=True, help="First user to create.")
@click.option("--password-env", default=None, metavar="VAR", help="Take the user's password from this environment variable.")
@click.option("--ssh-key", "ssh_key", default=None, type=click.Path(dir_okay=False, exists=True), help="Public key to authorize.")
@click.option("--no-ssh", is_flag=True, help="Do not enable the SSH server.")
@click.option("--no-uart", is_flag=True, help="Do not enable the UART serial console.")
@click.option("--coral", type=click.Choice(["pcie", "usb"]), default=None, help="Settings for a Coral on PCIe or USB.")
def provision(boot: str, hostname: str, user: str, password_env: str | None, ssh_key: str | None, no_ssh: bool, no_uart: bool,
              coral: str | None) -> None:
    """Prepare a mounted Raspberry Pi OS boot partition: UART console, SSH, first user, hostname, Coral settings.

    \b
    Example:
      EDGEMETA_PW=... edgemeta provision /media/$USER/bootfs --hostname kitchen --user pi \\
          --password-env EDGEMETA_PW --ssh-key ~/.ssh/id_ed25519.pub --coral usb
    """
    from firmware_tools.provision import ProvisionError
    from firmware_tools.provision import provision as run_provision

    password = os.environ.get(password_env) if password_env else None
    if password_env and password is None:
        raise EdgemetaError(f"environment variable {password_env} is not set")
    try:
        changes = run_provision(Path(boot), hostname=hostname, user=user, password=password,
                                ssh_pubkey=Path(ssh_key).read_text().strip() if ssh_key else None,
                                enable_ssh=not no_ssh, uart_console=not no_uart, coral=coral)
    except ProvisionError as e:
        raise EdgemetaError(str(e)) from None
    click.echo("\n".join(changes) if changes else "nothing to change: already provisioned")


@main.command()
@click.option("--device", required=True, help="Serial device of the board's console, e.g. /dev/ttyUSB0.")
@click.option("--baud", type=int, default=115200, show_default=True)
@click.option("--user", required=True, help="Login user.")
@click.option("--password-env", required=True, metavar="VAR", help="Environment variable holding the password.")
@click.option("--timeout", type=float, default=30.0, show_default=True)
@click.argument("command")
def console(device: str, baud: int, user: str, password_env: str, timeout: float, command: str) -> None:
    """Log in on a board's UART console (no network needed) and run one command; exits with its status.

    \b
    Example:
      EDGEMETA_PW=... edgemeta console --device /dev/ttyUSB0 --user pi --password-env EDGEMETA_PW "ip -brief addr"
    """
    from firmware_tools.console import ConsoleError, open_console, run_on_console

    password = os.environ.get(password_env)
    if password is None:
        raise EdgemetaError(f"environment variable {password_env} is not set")
    try:
        port = open_console(device, baud)
    except Exception as e:
        raise EdgemetaError(f"cannot open {device}: {e}") from None
    try:
        status, output = run_on_console(port, user, password, command, timeout=timeout)
    except ConsoleError as e:
        raise EdgemetaError(str(e)) from None
    finally:
        port.close()
    click.echo(output, nl=False)
    sys.exit(status)
