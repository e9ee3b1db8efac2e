"""Board commands: the enrollment store, the runtime, the agent. They run on a board, so they import
the runtime only (numpy and an interpreter), never TensorFlow or a host module."""

from __future__ import annotations

import json
import os

import click

from edgemeta.cli.app import Finite, main, seconds, whole
from edgemeta.cli.common import (
    adapt_setting,
    check_enroll_options,
    describe_head,
    enroll_options,
    open_set_setting,
    print_classes,
    print_enrolled,
    print_negatives,
    print_new_store,
    print_open_set,
    print_results,
)
from edgemeta.errors import EdgemetaError
from edgemeta.limits import BAUD_RANGE, MAX_THREADS, MAX_TOP_K


def _runtime(model: str | None, store: str, variant: str | None, threads: int, edgetpu: str | None, xnnpack: bool = True):
    """The runtime for a store: --model, else $EDGEMETA_MODEL, else the model the store was enrolled with."""
    from edgemeta.runtime.fewshot import FewShotRuntime
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
    f = click.option("--threads", type=whole(1, MAX_THREADS), default=1, show_default=True, help="Interpreter threads.")(f)
    f = click.option("--variant", default=None, help="Model variant (default: the manifest's, int8_static).")(f)
    f = click.option("--model", default=None, type=click.Path(file_okay=False),
                     help="Exported model folder (default: $EDGEMETA_MODEL or the store's).")(f)
    return click.option("--store", required=True, type=click.Path(), help="Enrollment store folder.")(f)


@main.command()
@_runtime_options
@enroll_options
@click.argument("files", nargs=-1, type=click.Path())
def enroll(store: str, model: str | None, variant: str | None, threads: int, edgetpu: str | None, xnnpack: bool,
           label: str | None, root: str | None, negative: bool, keep_samples: bool, allow_duplicates: bool,
           adapt_steps: str | None, lr: str | None, as_json: bool, files: tuple[str, ...]) -> None:
    """Teach the board a class from a few samples (images, .npy arrays or folders of them).

    The same image twice (already enrolled, or given twice) is skipped and reported.

    \b
    Example:
      edgemeta enroll --store ~/store --model models/omniglot-conv4 --label alpha a1.png a2.png
      edgemeta enroll --store ~/store --label beta photos/beta/
      edgemeta enroll --store ~/store --from-folders photos/
      edgemeta enroll --store ~/store --negative background/
    """
    from edgemeta.preprocess import class_folders

    adapt = check_enroll_options(label, root, negative, files, adapt_steps, lr)
    subs = class_folders(root) if root is not None else []
    rt = _runtime(model, store, variant, threads, edgetpu, xnnpack)
    if negative:
        images, _ = rt.images(list(files))
        n = rt.enroll_negatives(store, images)
        print_negatives(len(images), n, as_json)
        return
    if root is not None:
        classes = [(d.name, *rt.images([d])) for d in subs]  # every image read before the store is touched
    else:
        classes = [(label, *rt.images(list(files)))]
    done = rt.enroll_classes(store, classes, keep_samples=keep_samples, adapt=adapt, allow_duplicates=allow_duplicates)
    print_enrolled([{"label": c[0].strip(), "samples": d.samples, "added": d.added, "duplicates": d.duplicates}
                    for c, d in zip(classes, done, strict=True)], as_json, several=root is not None)
    _warn_domain(rt, store)


def _warn_domain(rt, store: str) -> None:
    """One warning line when the store's samples look unlike the model's training data."""
    from edgemeta.runtime.store import EnrollmentStore

    if EnrollmentStore.exists(store):
        warning = rt.describe_open_set(rt.open_store(store)).get("warning")
        if warning:
            click.echo(f"warning: {warning}", err=True)


@main.command()
@_runtime_options
@click.option("--accept", default=None, metavar="RATE",
              help="Choose the threshold so that this share of new samples of enrolled classes is accepted (default 0.95).")
@click.option("--false-accept", default=None, metavar="RATE",
              help="Instead: the largest threshold at which at most this share of strangers is accepted.")
@click.option("--threshold", default=None, metavar="DIST|off|model",
              help="Instead: set the distance yourself, turn 'unknown' off, or go back to the model's threshold.")
@click.option("--show", is_flag=True, help="Only show the store's current setting.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def calibrate(store: str, model: str | None, variant: str | None, threads: int, edgetpu: str | None, xnnpack: bool,
              accept: str | None, false_accept: str | None, threshold: str | None, show: bool, as_json: bool) -> None:
    """Set when the store answers 'unknown': from its own enrolled samples, or by hand.

    Leaves each enrolled sample out in turn: its distance to its own class (a new sample of a known
    class) and to the other classes (a stranger), plus any `enroll --negative` samples. The
    threshold follows the store: it is recomputed whenever classes change.

    \b
    Example:
      edgemeta calibrate --store ~/store                      # 95% of known samples accepted
      edgemeta calibrate --store ~/store --false-accept 0.05  # at most 5% of strangers accepted
      edgemeta calibrate --store ~/store --threshold 12.5
    """
    setting = open_set_setting(accept, false_accept, threshold, show)
    rt = _runtime(model, store, variant, threads, edgetpu, xnnpack)
    if setting["mode"] == "show":
        info = rt.describe_open_set(rt.open_store(store))
    else:
        info = rt.set_open_set(store, **setting)
    print_open_set(info, as_json)


@main.command()
@_runtime_options
@click.option("--top-k", type=whole(1, MAX_TOP_K), default=1, show_default=True, help="How many nearest classes to list.")
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
    print_results(rt.classify(store, list(files), top_k=top_k), as_json)


@main.command()
@click.option("--store", required=True, type=click.Path(), help="Enrollment store folder.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def classes(store: str, as_json: bool) -> None:
    """List the enrolled classes with their sample counts."""
    from edgemeta.runtime.store import EnrollmentStore

    s = EnrollmentStore.open(store)
    print_classes(s.counts(), s.backbone, as_json, s.adapt)


@main.command()
@click.option("--store", required=True, type=click.Path(), help="Enrollment store folder.")
@click.option("--label", required=True, help="The class to forget.")
def forget(store: str, label: str) -> None:
    """Remove a class and its samples from the store."""
    from edgemeta.runtime.store import EnrollmentStore

    n = EnrollmentStore.update(store, lambda s: s.forget(label))
    click.echo(f"forgot {label!r} ({n} sample(s))")


@main.command()
@click.option("--store", required=True, type=click.Path(), help="Enrollment store folder.")
@click.argument("old")
@click.argument("new")
def rename(store: str, old: str, new: str) -> None:
    """Rename a class."""
    from edgemeta.runtime.store import EnrollmentStore

    EnrollmentStore.update(store, lambda s: s.rename(old, new))
    click.echo(f"renamed {old!r} to {new.strip()!r}")


@main.command("new-store")
@click.option("--store", required=True, type=click.Path(), help="Enrollment store folder.")
def new_store(store: str) -> None:
    """Start over with an empty store in the same folder; the old one is kept in its archive/ folder.

    \b
    Example:
      edgemeta new-store --store ~/.edgemeta/store
    """
    from edgemeta.runtime.store import EnrollmentStore

    print_new_store(EnrollmentStore.archive(store))


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
    setting = adapt_setting(steps, lr)
    rt = _runtime(model, store, variant, threads, edgetpu, xnnpack)
    head = rt.adapt(store, *setting)
    click.echo(json.dumps(head) if as_json else f"store {store}: {describe_head(head)}")


@main.command()
@_runtime_options
@click.option("--out", default=None, type=click.Path(),
              help="Write the re-embedded store into this new folder and leave --store as it is (what an upgrade does).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def reenroll(store: str, model: str | None, variant: str | None, threads: int, edgetpu: str | None, xnnpack: bool,
             out: str | None, as_json: bool) -> None:
    """Re-embed a store's kept samples with a new model (after an upgrade).

    \b
    Example:
      edgemeta reenroll --store ~/store --model models/omniglot-vinyals-conv4
      edgemeta reenroll --store ~/store --model new-model --out ~/store-for-new-model
    """
    if not model and not os.environ.get("EDGEMETA_MODEL"):
        raise EdgemetaError("pass --model with the new model folder to re-enroll with")
    rt = _runtime(model, store, variant, threads, edgetpu, xnnpack)
    if out is not None:
        info = rt.carry(store, out)
        click.echo(json.dumps(info) if as_json else
                   f"{info['carried']}: {info['classes']} class(es), {info['samples']} sample(s) in {out} for "
                   f"{info['model']}/{info['variant']}")
        return
    n = rt.reenroll(store)
    click.echo(json.dumps({"samples": n}) if as_json else f"re-enrolled {n} sample(s) with {rt.backbone['model']}/{rt.backbone['variant']}")


@main.command()
@_runtime_options
@click.option("--format", "fmt", default="s16le", show_default=True, help="Raw PCM sample format: s16le, s32le, f32le or u8.")
@click.option("--rate", type=whole(8_000, 192_000), default=16_000, show_default=True, help="Raw PCM sample rate, Hz.")
@click.option("--channels", type=whole(1, 2), default=1, show_default=True, help="Raw PCM channels (averaged).")
@click.option("--hop-ms", type=whole(10, 10_000), default=100, show_default=True, help="A window is a candidate every hop.")
@click.option("--margin-db", type=Finite(0, 60), default=12.0, show_default=True,
              help="Voice-activity gate: this far above the noise floor ...")
@click.option("--min-dbfs", type=Finite(-100, 0), default=-55.0, show_default=True, help="... and above this level.")
@click.option("--hangover-ms", type=whole(0, 5000), default=300, show_default=True, help="An utterance ends after this much quiet.")
@click.option("--show-unknown", is_flag=True, help="Also print utterances that are no enrolled keyword.")
@click.option("--json", "as_json", is_flag=True, help="JSON lines: one per detection, then the costs.")
@click.argument("source", default="-", type=click.Path(allow_dash=True, dir_okay=False))
def listen(store: str, model: str | None, variant: str | None, threads: int, edgetpu: str | None, xnnpack: bool, fmt: str,
           rate: int, channels: int, hop_ms: int, margin_db: float, min_dbfs: float, hangover_ms: int, show_unknown: bool,
           as_json: bool, source: str) -> None:
    """Spot enrolled keywords in a live stream: raw PCM on standard input (or a .wav file), in a sliding
    window behind a voice-activity gate. Prints each detection with its time and distance, and at the
    end what it cost (time per window, share of one CPU core). Reads the store once, at the start.

    \b
    Example (a microphone on ALSA):
      arecord -q -D plughw:1 -f S16_LE -r 16000 -c 1 -t raw | edgemeta listen --store ~/store -
    """
    import sys

    from edgemeta.audio import DEFAULT_MAX_AUDIO_BYTES
    from edgemeta.files import read_regular
    from edgemeta.runtime.fewshot import UNKNOWN
    from edgemeta.runtime.listen import GateSettings, Spotter, check_stream, pcm_chunks, wav_chunks

    check_stream(fmt, channels, rate)
    rt = _runtime(model, store, variant, threads, edgetpu, xnnpack)
    pre = rt.manifest.preprocess
    if pre.kind != "audio":
        raise EdgemetaError(f"model {rt.manifest.name} takes images, not sound: listen needs a keyword model")
    classes = rt.open_store(store)
    if not classes.class_names:
        raise EdgemetaError(f"store {store} has no keywords; enroll some first (edgemeta enroll --label WORD a.wav b.wav c.wav)")
    head = rt.head(classes)
    if source == "-":
        chunks = pcm_chunks(sys.stdin.buffer, fmt, channels, rate)
    else:
        rate, chunks = wav_chunks(read_regular(source, DEFAULT_MAX_AUDIO_BYTES, "audio"), source)
    spotter = Spotter(pre, rate, lambda x: head.classify(rt.embedder(x[None]), 1, unknown=UNKNOWN)[0],
                      GateSettings(hop_ms, margin_db, min_dbfs, hangover_ms))

    def show(found) -> None:
        for d in found:
            if not (d.known or show_unknown):
                continue
            line = json.dumps(d.to_dict()) if as_json else f"{d.time_s:8.2f} s  {d.label:<16} distance {d.distance:.2f}"
            click.echo(line)

    try:
        for chunk in chunks:
            show(spotter.feed(chunk))
    except KeyboardInterrupt:
        pass
    show(spotter.flush())
    c = spotter.costs.summary()
    if as_json:
        click.echo(json.dumps({"costs": c}))
    else:
        click.echo(f"{c['audio_s']:.1f} s of audio, {c['windows_classified']} of {c['hops']} windows classified, "
                   f"{c['window_ms_median']:.1f} ms per window (p90 {c['window_ms_p90']:.1f}), "
                   f"{100 * c['cpu_share_of_one_core']:.1f}% of one CPU core", err=True)


@main.command()
@click.option("--audio", is_flag=True, help="Keywords instead: the shipped keyword model enrolls real recordings.")
@click.option("--model", default=None, type=click.Path(file_okay=False),
              help="Exported model folder.  [default: models/omniglot-conv4; --audio: models/keywords-conv4]")
@click.option("--samples", default=None, type=click.Path(file_okay=False),
              help="Folder with one sub-folder of samples per class.  [default: samples/omniglot; --audio: samples/speech_commands]")
@click.option("--way", type=whole(2, 1000), default=None, help="Classes enrolled per episode.  [default: 20; --audio: 5]")
@click.option("--shot", type=whole(1, 100), default=None, help="Samples enrolled per class.  [default: 1; --audio: 3]")
@click.option("--episodes", type=whole(1, 10_000), default=10, show_default=True, help="Seeded episodes.")
@click.option("--variant", default=None, help="Model variant (default: the manifest's, int8_static).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable summary.")
def demo(audio: bool, model: str | None, samples: str | None, way: int | None, shot: int | None, episodes: int,
         variant: str | None, as_json: bool) -> None:
    """Enroll characters the model never saw from one drawing each, classify the rest, with timings
    (--audio: five spoken keywords from three real recordings each).

    Runs on the board runtime only (no TensorFlow), through real enrollment stores on disk.

    \b
    Example:
      edgemeta demo --model models/omniglot-conv4 --samples samples/omniglot --way 20 --shot 1
      edgemeta demo --audio
    """
    from edgemeta.demo import run_demo

    model = model or ("models/keywords-conv4" if audio else "models/omniglot-conv4")
    samples = samples or ("samples/speech_commands" if audio else "samples/omniglot")
    way, shot = way or (5 if audio else 20), shot or (3 if audio else 1)
    s = run_demo(model, samples, way, shot, episodes, variant=variant, log=(lambda m: None) if as_json else click.echo)
    if as_json:
        click.echo(json.dumps(s, indent=2))
        return
    ci = f" +/- {s['ci95']:.1f}" if s["ci95"] is not None else ""
    if s["input"] == "audio":
        click.echo(f"\n{s['way']}-way {s['shot']}-shot on real voices: accuracy {s['accuracy']:.1f}{ci}% over {s['episodes']} "
                   f"episodes ({s['queries']} recordings of {s['classes']} keywords in {samples}, words the model never "
                   f"trained on); {s['answered_known']:.0f}% answered as known")
    else:
        click.echo(f"\n{s['way']}-way {s['shot']}-shot on unseen characters: accuracy {s['accuracy']:.1f}{ci}% "
                   f"over {s['episodes']} episodes ({s['queries']} drawings); {s['answered_known']:.0f}% answered as known "
                   "(near enough to an enrolled character; the rest would be answered 'unknown')")
    ref = s["reference"]
    if ref:
        click.echo(f"the export measured {ref['accuracy']:.2f} +/- {ref['ci95']:.2f}% for this setting over {ref['episodes']} "
                   f"episodes of its whole test split; this demo draws from the {s['classes']} characters of "
                   f"{s['alphabets']} alphabet(s) in {samples}, where look-alike characters of one alphabet meet more "
                   "often (`edgemeta eval --within-alphabet` measures that case)")
    click.echo(f"timings: model load {s['model_load_ms']:.0f} ms, enroll {s['enroll_ms_per_class']:.1f} ms per class, "
               f"classify {s['classify_ms_per_image']:.2f} ms per sample ({s['runtime']}, {s['variant']})")


@main.command()
@click.option("--model", required=True, type=click.Path(file_okay=False), help="Exported model folder.")
@click.option("--store", default=None, type=click.Path(), help="Also check this enrollment store fits the model.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def health(model: str, store: str | None, as_json: bool) -> None:
    """Load the model and embed a sample: the check deploy runs on a board after installing a release."""
    from edgemeta.runtime.health import check_health

    out = check_health(model, store)
    if as_json:
        click.echo(json.dumps(out))
    else:
        click.echo(f"ok: {out['model']}/{out['variant']} on {out['runtime']} loaded and embedded in {out['ms']} ms"
                   + (f"; store has {out['store']['classes']} classes"
                      + ("" if out["store"]["matches_model"] else " enrolled with another model (run edgemeta reenroll)")
                      if out["store"] else ""))


@main.command()
@click.option("--model", required=True, type=click.Path(file_okay=False), help="Exported model folder.")
@click.option("--store", required=True, type=click.Path(), help="Enrollment store folder.")
@click.option("--socket", "unix_path", default=None, help="Listen on this Unix socket.")
@click.option("--tcp", default=None, metavar="HOST:PORT",
              help="Listen on TCP: loopback (127.0.0.1), or any other address with --allow-remote and a token.")
@click.option("--allow-remote", is_flag=True,
              help="Let --tcp listen beyond loopback; every connection must then send the token first.")
@click.option("--token-file", default=None, type=click.Path(dir_okay=False),
              help="File holding the token TCP clients must send (mode 600; default: $EDGEMETA_TOKEN).")
@click.option("--serial", "serial_device", default=None, help="Also answer framed requests on this serial port.")
@click.option("--baud", type=whole(*BAUD_RANGE), default=115200, show_default=True, help="Serial speed.")
@click.option("--serial-reopen-for", type=seconds(0, 7 * 86400), default=300.0, show_default=True, metavar="SECONDS",
              help="When the serial port goes away, keep reopening it this long, then exit non-zero (for systemd).")
@click.option("--stdio", is_flag=True, help="Answer JSON lines on stdin/stdout (what `remote --via ssh:` uses).")
@click.option("--idle-timeout", type=seconds(0, 86400), default=60.0, show_default=True, metavar="SECONDS",
              help="Close a connection that sends nothing for this long (0: never).")
@click.option("--max-connections", type=whole(1, 4096), default=32, show_default=True,
              help="Connections served at once on each listener (the socket has its own); one more gets a 'busy' answer.")
@click.option("--auth-timeout", type=seconds(0.1, 3600), default=10.0, show_default=True, metavar="SECONDS",
              help="With a token: a TCP connection that has not sent it this long is closed (at most 8 wait at once, "
                   "2 per address).")
@click.option("--drain-timeout", type=seconds(0, 3600), default=30.0, show_default=True, metavar="SECONDS",
              help="On SIGTERM: how long requests already started may take to be answered before the agent exits.")
@click.option("--max-request-bytes", type=whole(1, 2**31), default=64 * 2**20, show_default=True,
              help="Longest request line (images travel base64-encoded inside it).")
@click.option("--decode-slots", type=whole(1, 64), default=None,
              help="Large images decoded at once (default: 1, or 2 on boards with 2 GB or more).")
@click.option("--threads", type=whole(1, MAX_THREADS), default=1, show_default=True, help="Interpreter threads.")
@click.option("--edgetpu", default=None, metavar="DEVICE", help="Run on the Edge TPU delegate.")
def serve(model: str, store: str, unix_path: str | None, tcp: str | None, allow_remote: bool, token_file: str | None,
          serial_device: str | None, baud: int, serial_reopen_for: float, stdio: bool, idle_timeout: float,
          max_connections: int, auth_timeout: float, drain_timeout: float, max_request_bytes: int, decode_slots: int | None,
          threads: int, edgetpu: str | None) -> None:
    """The board agent: keeps the model and store loaded and answers enroll, classify, classes,
    forget, rename, adapt and status requests (JSON lines on a socket or stdio; framed on a serial port).

    \b
    Example:
      edgemeta serve --model ~/.edgemeta/current/model --store ~/.edgemeta/store --socket ~/.edgemeta/agent.sock --serial /dev/serial0
      edgemeta serve --model ... --store ... --tcp 0.0.0.0:7000 --allow-remote --token-file /etc/edgemeta/token
    """
    from edgemeta.runtime.agent.run import run_agent

    run_agent(model, store, threads=threads, edgetpu=edgetpu, unix_path=unix_path, tcp=tcp, serial_device=serial_device,
              baud=baud, stdio=stdio, allow_remote=allow_remote, token_file=token_file, idle_timeout=idle_timeout,
              max_connections=max_connections, decode_slots=decode_slots, max_request_bytes=max_request_bytes,
              serial_reopen_for=serial_reopen_for, auth_seconds=auth_timeout, drain_seconds=drain_timeout,
              log=lambda m: click.echo(m, err=True))
