"""Fleet commands, run on the host to reach boards: board profiles, bundles, deploy over ssh,
rollback, status, doctor (here or on a board over ssh); `remote` is in remote.py."""

from __future__ import annotations

import functools
import json
import sys
from typing import TYPE_CHECKING

import click

from edgemeta.cli.app import main, whole
from edgemeta.errors import EdgemetaError
from edgemeta.limits import MAX_PARALLEL

if TYPE_CHECKING:
    from edgemeta.sshcmd import SshOptions


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
    debs = rt.get("system_packages") or []
    click.echo("  system packages  " + (f"{', '.join(debs)} (sudo apt install {' '.join(debs)}; the venv sees them)" if debs else
                                        "none (deploy installs the runtime in a venv; the OS needs python3-venv)"))
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


SSH_CONFIG_HELP = "ssh -F FILE: the ssh config to read instead of ~/.ssh/config (and /etc/ssh/ssh_config)."
PORT_HELP = "The board's ssh port, for every host given (default: the ssh config's, else 22)."
IDENTITY_HELP = ("The private key to log in with, for every host given (ssh -i, with IdentitiesOnly; default: the ssh config's "
                 "and ssh's own).")
ACCEPT_NEW_HELP = ("First contact with a board: record its host key when known_hosts has none for it yet (OpenSSH's "
                   "StrictHostKeyChecking=accept-new); a changed key is still refused. Safer: check the key first (README, Deploy).")


def ssh_options(f):
    """--ssh-config, --port, --identity and --accept-new-host-key, given to the command as one `ssh`
    (edgemeta.sshcmd.SshOptions, checked: a port out of range, a key file ssh cannot use is a one-line
    error before any board is reached). They apply to every host of the command and win over the ssh config."""
    @functools.wraps(f)
    def command(*args, ssh_config: str | None, port: int | None, identity: str | None, accept_new_host_key: bool, **kwargs):
        from edgemeta.sshcmd import SshOptions

        return f(*args, ssh=SshOptions(ssh_config, port, identity, accept_new_host_key).checked(), **kwargs)

    for option in reversed([
            click.option("--ssh-config", default=None, type=click.Path(dir_okay=False), help=SSH_CONFIG_HELP),
            click.option("--port", default=None, type=whole(1, 65535), metavar="PORT", help=PORT_HELP),
            click.option("--identity", default=None, type=click.Path(dir_okay=False), metavar="FILE", help=IDENTITY_HELP),
            click.option("--accept-new-host-key", is_flag=True, help=ACCEPT_NEW_HELP)]):
        command = option(command)
    return command


def ssh_only(ssh: SshOptions, what: str) -> None:
    """A one-line error where --port, --identity or --accept-new-host-key is given to a command that reaches no board over ssh."""
    given = [name for name, on in (("--port", ssh.port is not None), ("--identity", ssh.identity),
                                   ("--accept-new-host-key", ssh.accept_new_host_key)) if on]
    if given:
        raise EdgemetaError(f"{', '.join(given)}: {'these are' if len(given) > 1 else 'it is'} for reaching a board over ssh; {what}")


SIGN_KEY_HELP = "Private key to sign the bundle with (default: yours, made on first use; see `edgemeta keygen`)."


def _note(msg: str) -> None:
    click.echo(msg, err=True)


@main.command()
@click.option("--key", "key_path", default=None, type=click.Path(dir_okay=False),
              help="Where to write it (default: signing_key.pem in $EDGEMETA_CONFIG, else ~/.config/edgemeta).")
def keygen(key_path: str | None) -> None:
    """Make your bundle signing key (ed25519), once. A board trusts a key only when told (`edgemeta deploy
    --trust-key`, at its first deploy) and refuses bundles signed by any other; the private key stays in a
    file only you can read, never printed.

    \b
    Example:
      edgemeta keygen
    """
    from edgemeta.deploy.signing import create_key, default_key_path

    path = key_path or default_key_path()
    fp = create_key(path)
    click.echo(f"signing key {fp} written to {path} (readable by you alone); boards trust it once told to (edgemeta deploy "
               "--trust-key): back it up")


@main.command()
@click.option("--board", required=True, help="Board profile (see `edgemeta boards`).")
@click.option("--model", required=True, type=click.Path(file_okay=False), help="Exported model folder.")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Bundle folder to write: new, empty, or an earlier bundle (replaced once the new one is built).")
@click.option("--wheelhouse", is_flag=True, help="Include every wheel for the board's platform (offline install).")
@click.option("--sign-key", default=None, type=click.Path(dir_okay=False), help=SIGN_KEY_HELP)
def bundle(board: str, model: str, out: str, wheelhouse: bool, sign_key: str | None) -> None:
    """Build a checksummed, signed release of a model for one board; refuses a model the board cannot run.

    \b
    Example:
      edgemeta bundle --board rpi5 --model models/omniglot-conv4 --out dist/rpi5 --wheelhouse
    """
    from edgemeta.deploy.bundle import build_bundle

    path = build_bundle(board, model, out, wheelhouse=wheelhouse, sign_key=sign_key, log=_note)
    n = sum(1 for p in path.rglob("*") if p.is_file())
    click.echo(f"bundle for {board} written to {path} ({n} files)")


FRESH_STORE_HELP = ("Give the release an empty store instead of carrying the board's (which stays on the board, "
                    "in ROOT/stores/): for a store that cannot be carried, or to start over.")


@main.command()
@click.option("--board", default=None, help="Board profile; builds the bundle from --model.")
@click.option("--model", default=None, type=click.Path(file_okay=False), help="Exported model folder (with --board).")
@click.option("--bundle", "bundle_dir", default=None, type=click.Path(file_okay=False), help="A bundle already built.")
@click.option("--host", "hosts", multiple=True, help="user@host or an ~/.ssh/config alias (repeatable).")
@click.option("--hosts", "hosts_file", default=None, type=click.Path(dir_okay=False), help="File with one host per line.")
@ssh_options
@click.option("--parallel", type=whole(1, MAX_PARALLEL), default=4, show_default=True, help="Hosts deployed at once.")
@click.option("--wheelhouse", is_flag=True, help="Ship every wheel with the bundle: boards install offline.")
@click.option("--dry-run", is_flag=True, help="Check the hosts and say what would happen; change nothing.")
@click.option("--sign-key", default=None, type=click.Path(dir_okay=False), help=SIGN_KEY_HELP + " With --board/--model.")
@click.option("--service", is_flag=True,
              help="Then install and start the agent's systemd unit (as the deploying user; sudo -n on the board).")
@click.option("--trust-key", is_flag=True,
              help="A board that trusts no signing key yet trusts the bundle's from now on (sent over your ssh login; "
                   "its fingerprint is printed). Needed for a board's first deploy.")
@click.option("--add-key", is_flag=True, help="With --trust-key: a board that trusts other keys trusts the bundle's beside them.")
@click.option("--fresh-store", is_flag=True, help=FRESH_STORE_HELP)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable per-host results.")
def deploy(board: str | None, model: str | None, bundle_dir: str | None, hosts: tuple[str, ...], hosts_file: str | None,
           ssh: SshOptions, parallel: int, wheelhouse: bool, dry_run: bool, sign_key: str | None, service: bool,
           trust_key: bool, add_key: bool, fresh_store: bool, as_json: bool) -> None:
    """Deploy a model to boards over SSH: verify, install, health-check, then activate atomically; each board
    finishes on its own once it has the bundle. A release already active is left alone, one on the board is
    activated without upload, one whose runtime the board has reuses its venv (a model-only upgrade: no pip);
    the release id names the content, so --dry-run names what a deploy would run. Before a board makes a venv,
    the checks of `edgemeta doctor` run there; a failure stops that board's deploy with its fix. A board takes
    only bundles signed by a key it trusts, and trusts none until told: --trust-key at its first deploy. The
    board's enrollments come along: its store's kept samples are re-embedded with the new model before the
    switch (a store that cannot be carried stops the deploy first), and a rollback carries them back.

    \b
    Example:
      edgemeta deploy --board rpi5 --model models/omniglot-conv4 --host pi@kitchen --host pi@garage --trust-key --service
      edgemeta deploy --bundle dist/rpi5 --hosts fleet.txt --parallel 8
    """
    from edgemeta.deploy.fleet_ops import deploy_release
    from edgemeta.deploy.ssh import Stopped, stop_on_signals

    if dry_run and service:
        raise EdgemetaError("--service with --dry-run: a dry run changes nothing; drop one of them")
    targets = _targets(hosts, hosts_file)
    stop_on_signals()
    try:
        results = deploy_release(targets, bundle_dir, board, model, wheelhouse, ssh, dry_run, parallel,
                                 log=_progress(as_json), sign_key=sign_key, service=service, trust_key=trust_key, add_key=add_key,
                                 fresh_store=fresh_store)
    except Stopped as e:
        click.echo(f"error: deploy stopped by {e}: a board that had received the whole bundle finishes the deploy on its "
                   "own (health check first), every other keeps its active release; `edgemeta deploy --dry-run` shows "
                   "what each runs", err=True)
        sys.exit(128 + e.signum)
    _print_results(results, as_json)


def _targets(hosts: tuple[str, ...], hosts_file: str | None) -> list[str]:
    from edgemeta.deploy.hosts import read_hosts_file

    return list(hosts) + (read_hosts_file(hosts_file) if hosts_file else [])


def _progress(as_json: bool):
    return (lambda h, m: None) if as_json else (lambda h, m: click.echo(f"{h}: {m}", err=True))


def _print_results(results: list, as_json: bool) -> None:
    """The per-host table (or JSON) of deploy and rollback; exit 1 when a host failed."""
    if as_json:
        click.echo(json.dumps([r.__dict__ for r in results], indent=2))
    else:
        width = max(len(r.host) for r in results)
        click.echo(f"{'host':{width}}  result  release / error")
        for r in results:
            shown = (r.release + (f" ({r.note})" if r.note else "") + (f" (now trusts key {r.trusted_key})" if r.trusted_key else "")
                     if r.ok else r.error)
            click.echo(f"{r.host:{width}}  {'ok' if r.ok else 'FAILED':6}  {shown}")
    if not all(r.ok for r in results):
        sys.exit(1)


HOSTS_HELP = "user@host or an ~/.ssh/config alias (repeatable)."
HOSTS_FILE_HELP = "File with one host per line (# comments)."


@main.command()
@click.option("--host", "hosts", multiple=True, help=HOSTS_HELP)
@click.option("--hosts", "hosts_file", default=None, type=click.Path(dir_okay=False), help=HOSTS_FILE_HELP)
@click.option("--to", "to", default=None, metavar="ID",
              help="The release to switch to, older or newer (roll forward), if it is on the board (see `edgemeta status`).")
@ssh_options
@click.option("--parallel", type=whole(1, MAX_PARALLEL), default=4, show_default=True, help="Hosts at once.")
@click.option("--fresh-store", is_flag=True, help=FRESH_STORE_HELP)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable per-host results.")
def rollback(hosts: tuple[str, ...], hosts_file: str | None, to: str | None, ssh: SshOptions, parallel: int,
             fresh_store: bool, as_json: bool) -> None:
    """Switch boards back to the release active before the current one (a second rollback goes one further
    back), or with --to to any release on the board, older or newer. The board health-checks the target
    before the switch and through `current` after it, and switches back if that fails.

    \b
    Example:
      edgemeta rollback --host pi@kitchen
      edgemeta rollback --hosts fleet.txt --to omniglot-conv4-int8_static-3f2a9c1d0b7e
    """
    from edgemeta.deploy.board_ops import RELEASE_ID
    from edgemeta.deploy.fleet_ops import rollback_host
    from edgemeta.deploy.hosts import each_host

    if to is not None and not RELEASE_ID.fullmatch(to):
        raise EdgemetaError(f"--to {to[:80]!r} is not a release id: letters, digits, '.', '_' and '-' (see `edgemeta status`)")
    log = _progress(as_json)
    _print_results(each_host(_targets(hosts, hosts_file), lambda h: rollback_host(h, ssh, to or "", log, fresh_store),
                             parallel), as_json)


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MB"


@main.command()
@click.option("--host", "hosts", multiple=True, help=HOSTS_HELP)
@click.option("--hosts", "hosts_file", default=None, type=click.Path(dir_okay=False), help=HOSTS_FILE_HELP)
@ssh_options
@click.option("--parallel", type=whole(1, MAX_PARALLEL), default=4, show_default=True, help="Hosts at once.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable, one object per host.")
def status(hosts: tuple[str, ...], hosts_file: str | None, ssh: SshOptions, parallel: int, as_json: bool) -> None:
    """What boards run: the active release (model, algorithm, variant, runtime), its health (checked now,
    through `current`), the releases on the board and the history, the store (classes, size) and free space.
    Exit 1 when a board cannot be reached or its active release is unhealthy.

    \b
    Example:
      edgemeta status --host pi@kitchen
      edgemeta status --hosts fleet.txt --json
    """
    from edgemeta.deploy.fleet_ops import status_host
    from edgemeta.deploy.hosts import each_host

    answers = each_host(_targets(hosts, hosts_file), lambda h: status_host(h, ssh), parallel)
    if as_json:
        click.echo(json.dumps(answers, indent=2))
    else:
        click.echo("\n\n".join(_describe_status(a) for a in answers))
    if not all(a["ok"] and a.get("health", {"ok": True})["ok"] for a in answers):
        sys.exit(1)


def _describe_status(a: dict) -> str:
    if not a["ok"]:
        return f"{a['host']}: FAILED {a['error']}"
    now, details = a["current"], a["details"]
    lines = [f"{a['host']}: " + (f"active {now}" if now else "no release active") + f"  ({a['root']}, {a['free_mb']} MB free)"]
    if now:
        d, h = details.get(now, {}), a["health"]
        lines.append(f"  model    {d.get('model')} ({d.get('algorithm') or '?'}, {d.get('variant')}), board profile {d.get('board')}")
        lines.append(f"  runtime  {d.get('runtime')}, edgemeta {d.get('edgemeta') or '?'}, venv {d.get('venv') or 'its own'}")
        store = h.get("store") or {}
        lines.append("  health   " + (f"ok ({h['runtime']}, loaded and embedded in {h['ms']} ms)" if h["ok"] else f"FAILED {h['error']}"))
        lines.append(f"  store    {store.get('classes', 0)} class(es), {_mb(a['bytes']['store'])}"
                     + ("" if store.get("matches_model", True) else "; enrolled with another model: run edgemeta reenroll"))
    history = a["history"]
    lines.append("  history  " + (" -> ".join(f"[{x}]" if x == now else x for x in history) if history else "none"))
    others = [x for x in a["releases"] if x != now]
    for x in others:
        d = details[x]
        lines.append(f"  on board {x}: {d['model']} ({d['variant']}, {d['runtime']}), {d['state']}"
                     + ("" if d["state"] != "installed" else f" (edgemeta rollback --to {x})"))
    lines.append(f"  disk     releases {_mb(a['bytes']['releases'])}, {len(a['venvs'])} venv(s) {_mb(a['bytes']['venvs'])}")
    return "\n".join(lines)


@main.command()
@click.option("--board", default=None, help="Check against this board profile (runtime, delegate, serial).")
@click.option("--host", default=None, help="Run the checks on this board over ssh (before or after deploy).")
@ssh_options
@click.option("--wheelhouse", is_flag=True, help="You will deploy with --wheelhouse: the board needs no package index.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def doctor(board: str | None, host: str | None, ssh: SshOptions, wheelhouse: bool, as_json: bool) -> None:
    """Will a deploy to this board succeed? Python and glibc against the profile, architecture, python3 -m venv,
    a package index or the need for --wheelhouse, the profile's system packages, space and write access
    where releases go; then the interpreter, Edge TPU library and USB ids, groups, memory, serial port.
    Each check passes, warns or fails with the one command that fixes it; exit 1 on a failure. `edgemeta
    deploy` runs the same checks before a board makes a venv.

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
        from edgemeta.deploy.fleet_ops import doctor_on_host

        checks = doctor_on_host(host, ssh, profile, wheelhouse=wheelhouse)
    else:
        ssh_only(ssh, "give --host user@board to run the checks there")
        from edgemeta.runtime.paths import board_root

        checks = doc.run_checks(profile, str(board_root()), wheelhouse=wheelhouse)
    click.echo(json.dumps(checks, indent=2) if as_json else doc.format_checks(checks))
    if any(c["status"] == "fail" for c in checks):
        sys.exit(1)


