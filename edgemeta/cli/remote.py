"""`edgemeta remote --via ...`: the board's own commands, run by its agent over ssh, a socket or a
serial line, with the same options, messages and exit codes as on the board (tests/test_remote_parity.py
walks the board's commands and checks each has its remote form here)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import click

from edgemeta.cli.app import main, seconds, whole
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
from edgemeta.cli.fleet import ssh_only, ssh_options
from edgemeta.errors import EdgemetaError
from edgemeta.limits import MAX_TOP_K

if TYPE_CHECKING:
    from edgemeta.sshcmd import SshOptions

# board commands that have no remote form, and why (the parity test reads this)
BOARD_ONLY = {"demo": "runs on its own sample folder, not on a board's store",
              "health": "the release check deploy runs on the board (`edgemeta status --host` shows it)",
              "listen": "it reads the board's own microphone stream, for as long as it runs",
              "serve": "it is the agent that remote talks to"}
BOARD_ONLY_OPTIONS = {("reenroll", "out"): "the step of an upgrade that deploy runs on the board; the agent has one store"}


@main.group()
@click.option("--via", required=True, help="unix:PATH, tcp:HOST:PORT, ssh:USER@HOST (the deployed release) or serial:DEVICE[@BAUD].")
@ssh_options
@click.option("--timeout", type=seconds(0.1, 86400), default=30.0, show_default=True, help="Seconds to wait for an answer.")
@click.option("--token-file", default=None, type=click.Path(dir_okay=False),
              help="With tcp: the agent's token, from this file (mode 600; default: $EDGEMETA_TOKEN).")
@click.pass_context
def remote(ctx: click.Context, via: str, ssh: SshOptions, timeout: float, token_file: str | None) -> None:
    """Run the board's commands on a board: enroll, classify, classes, forget, rename, calibrate, adapt,
    reenroll, new-store, status. With --via ssh:, --port, --identity and --accept-new-host-key say how
    ssh reaches the board, as for deploy.

    \b
    Example:
      edgemeta remote --via ssh:pi@kitchen enroll --label mug mug1.jpg mug2.jpg
      edgemeta remote --via ssh:pi@kitchen --port 2222 --identity ~/.ssh/kitchen_ed25519 classes
      edgemeta remote --via ssh:pi@kitchen enroll --from-folders photos/
      edgemeta remote --via serial:/dev/ttyUSB0 classify --top-k 3 cup.jpg
    """
    if not via.startswith("ssh:"):
        ssh_only(ssh, f"--via {via.partition(':')[0] or via}: connects without ssh (use --via ssh:USER@HOST)")
    ctx.obj.update(via=via, ssh=ssh, timeout=timeout, token_file=token_file)


def _files(paths: list[Path]) -> list[bytes]:
    out = []
    for f in paths:
        try:
            out.append(Path(f).read_bytes())
        except OSError as e:
            raise EdgemetaError(f"cannot read {f}: {e.strerror}") from None
    return out


def _call(op: str, args: dict, attachments: list[bytes] = ()) -> dict:
    from edgemeta.remote import connect

    obj = click.get_current_context().obj
    client = connect(obj["via"], obj["ssh"], obj["timeout"], obj.get("token_file"))  # (ssh: SshOptions, for AgentOverSsh)
    try:
        return client.request(op, args, list(attachments))
    finally:
        client.close()


@remote.command("enroll")
@enroll_options
@click.argument("files", nargs=-1, type=click.Path())
def remote_enroll(label: str | None, root: str | None, negative: bool, keep_samples: bool, allow_duplicates: bool,
                  adapt_steps: str | None, lr: str | None, as_json: bool, files: tuple[str, ...]) -> None:
    """Enroll image files or folders (sent to the board), as `edgemeta enroll`."""
    from edgemeta.preprocess import class_folders, folder_files

    adapt = check_enroll_options(label, root, negative, files, adapt_steps, lr)
    args: dict = {"keep_samples": keep_samples, "allow_duplicates": allow_duplicates}
    if adapt is not None:
        args.update(adapt=adapt[0], lr=adapt[1])
    if negative:
        paths = folder_files(list(files))
        r = _call("enroll", {"negative": True}, _files(paths))
        print_negatives(r["added"], r["negatives"], as_json)
        return
    if root is not None:
        groups = [(d.name, folder_files([d])) for d in class_folders(root)]
        paths = [p for _, ps in groups for p in ps]
        args.update(labels=[name for name, _ in groups], counts=[len(ps) for _, ps in groups])
        done = _call("enroll", args, _files(paths))["classes"]
    else:
        done = [_call("enroll", {**args, "label": label}, _files(folder_files(list(files))))]
    print_enrolled(done, as_json, several=root is not None)


@remote.command("classify")
@click.option("--top-k", type=whole(1, MAX_TOP_K), default=1, show_default=True, help="How many nearest classes to list.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.argument("files", nargs=-1, required=True, type=click.Path())
def remote_classify(top_k: int, as_json: bool, files: tuple[str, ...]) -> None:
    """Classify image files on the board."""
    from edgemeta.preprocess import folder_files

    paths = folder_files(list(files))
    results = _call("classify", {"top_k": top_k}, _files(paths))["results"]
    for f, r in zip(paths, results, strict=True):
        r["file"] = str(f)
    print_results(results, as_json)


@remote.command("classes")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def remote_classes(as_json: bool) -> None:
    """List the board's enrolled classes."""
    r = _call("classes", {})
    print_classes(r["classes"], r["backbone"], as_json, (r.get("head") or {}).get("adapt"))


@remote.command("forget")
@click.option("--label", required=True, help="The class to forget.")
def remote_forget(label: str) -> None:
    """Remove a class on the board."""
    r = _call("forget", {"label": label})
    click.echo(f"forgot {label!r} ({r['removed']} sample(s))")


@remote.command("rename")
@click.argument("old")
@click.argument("new")
def remote_rename(old: str, new: str) -> None:
    """Rename a class on the board."""
    _call("rename", {"old": old, "new": new})
    click.echo(f"renamed {old!r} to {new.strip()!r}")


@remote.command("calibrate")
@click.option("--accept", default=None, metavar="RATE", help="This share of new samples of enrolled classes accepted (default 0.95).")
@click.option("--false-accept", default=None, metavar="RATE", help="Instead: at most this share of strangers accepted.")
@click.option("--threshold", default=None, metavar="DIST|off|model", help="Instead: a distance, 'off', or the model's threshold.")
@click.option("--show", is_flag=True, help="Only show the store's current setting.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def remote_calibrate(accept: str | None, false_accept: str | None, threshold: str | None, show: bool, as_json: bool) -> None:
    """Set when the board's store answers 'unknown' (as `edgemeta calibrate`)."""
    print_open_set(_call("calibrate", open_set_setting(accept, false_accept, threshold, show)), as_json)


@remote.command("adapt")
@click.option("--steps", required=True, metavar="N", help="Gradient steps (0 to 1000; 0 turns adaptation off).")
@click.option("--lr", default=None, metavar="RATE", help="Learning rate (default: as `edgemeta adapt`).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def remote_adapt(steps: str, lr: str | None, as_json: bool) -> None:
    """Set the board store's head adaptation (as `edgemeta adapt`)."""
    n, rate = adapt_setting(steps, lr)
    head = _call("adapt", {"steps": n, "lr": rate})
    click.echo(json.dumps(head) if as_json else f"board store: {describe_head(head)}")


@remote.command("reenroll")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def remote_reenroll(as_json: bool) -> None:
    """Re-embed the board store's kept samples with the agent's model (deploy does it at an upgrade)."""
    r = _call("reenroll", {})
    click.echo(json.dumps(r) if as_json else f"re-enrolled {r['samples']} sample(s) with {r['model']}")


@remote.command("new-store")
def remote_new_store() -> None:
    """Start over with an empty store on the board; the old one is kept in the store's archive/ folder."""
    print_new_store(_call("new_store", {})["archived"])


@remote.command("status")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def remote_status(as_json: bool) -> None:
    """The agent's model, runtime and store."""
    r = _call("status", {})
    click.echo(json.dumps(r, indent=2) if as_json else
               f"{r['model']}/{r['variant']} on {r['runtime']}: {r['classes']} class(es), {r['requests']} request(s), up {r['uptime_s']} s")
