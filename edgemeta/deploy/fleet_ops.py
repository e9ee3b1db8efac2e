"""Fleet operations: deploy, roll back, ask for status and run doctor on boards, over ssh.Remote.

Order of a deploy on one host: upload board_ops.py (checked by its sha256 before it replaces the old
copy) -> preflight (architecture, Python, whether the release is active, on the board, or absent, whether
the venv of its runtime is there, and the signing keys the board trusts: an upload signed by a key
it does not trust stops here, before anything is sent) -> where the board must make a venv,
edgemeta/doctor.py's checks (the ones `edgemeta doctor` runs: venv, package index or wheelhouse,
system packages, space, write access, Python and glibc against the profile), any failure stopping
the deploy with its fix -> with `trust_key` (`--trust-key`), where the board does not trust the
bundle's key yet, `board_ops.py trust KEY` (once the bundle's signature checked out here; a board
that trusts other keys takes one more only with `add_key`, `--add-key`): a board never trusts a key
on its own, the ssh login the user has is what authenticates the key -> then one ssh call that
the board runs to the end on its own, whatever happens to this process: `board_ops.py deploy`,
which takes the bundle as a tar stream, checks its signature (by a trusted key) and that the files
are exactly the signed list, installs the runtime in the release's venv (never TensorFlow),
health-checks the new release (load the model, embed a sample), and only then switches `current`
atomically and prunes old releases. A release already active is left alone; one on the board
already is activated without upload or install.

A release id names the content (bundle.new_release_id), so `--dry-run` names the release the real
run deploys. SIGTERM or Ctrl-C (stop_on_signals) stops every ssh this process started: an upload
cut short is refused by the board, a board that has the whole bundle finishes the deploy itself.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable
from pathlib import Path

from edgemeta.deploy.board_ops import fingerprint
from edgemeta.deploy.bundle_read import bundle_info, bundle_signer, checked_signer, release_id
from edgemeta.deploy.hosts import NO_HOSTS, HostResult, each_host
from edgemeta.deploy.ssh import Remote, ssh_failure
from edgemeta.errors import EdgemetaError
from edgemeta.runtime.paths import ROOT_SH
from edgemeta.sshcmd import SshOptions, as_ssh_options, check_host


def board_event(step: Callable[[str], None]) -> Callable[[dict], None]:
    """How a board's progress lines ({"event": ...}) are told, one step each."""
    def event(e: dict) -> None:
        if e["event"] == "received":
            step(f"uploaded; signature (key {e['key']}, trusted) and checksums of {e['files']} files verified on the board"
                 + (f"; {e['note']}: kept" if e.get("note") else ""))
        elif e["event"] == "installed":
            step(f"runtime installed in a new venv (venvs/{e.get('key')})" if e.get("venv") == "made" else
                 f"runtime venv venvs/{e.get('key')} reused: same runtime, no install")
        elif e["event"] == "healthy":
            step(f"health check of {e.get('healthy')} passed before the switch ({e.get('model')}/{e.get('variant')} on "
                 f"{e.get('runtime')}, {e.get('ms')} ms)")
        elif e["event"] == "store":
            how = e.get("carried", "")
            step(f"store for {e.get('release')}: {how}" + (f" ({e['classes']} class(es), {e['samples']} sample(s) for "
                                                           f"{e.get('model')})" if "samples" in e else ""))
        elif e["event"] == "agent":
            step("the agent's service restarted on the new release" if e.get("restarted") else f"warning: {e.get('error')}")
    return event


def not_ready(checks: list[dict]) -> str:
    """One line for the checks that failed ("" when none did): each with its fix."""
    failed = [c for c in checks if c["status"] == "fail"]
    return "; ".join(f"{c['check']}: {c['detail']}" + (f" (fix: {c['fix']})" if c["fix"] else "") for c in failed)


def key_refusal(host: str, fp: str, trusted: list[str], trust_key: bool, add_key: bool) -> str:
    """Why a board that trusts the keys `trusted` (fingerprints) does not get a bundle signed by key `fp`
    ("" when it does, or will once trusted: with `trust_key`, and `add_key` where it trusts others)."""
    if fp in trusted or (trust_key and (add_key or not trusted)):
        return ""
    if not trusted:
        return (f"{host} trusts no signing key yet: deploy with --trust-key to trust the bundle's key {fp} there (it "
                "goes over your ssh login, which is what makes it trusted); nothing was uploaded")
    return (f"the bundle is signed by key {fp}, which {host} does not trust (it trusts {', '.join(trusted)}): sign it with "
            f"that key, or trust {fp} beside it with --trust-key --add-key; nothing was uploaded")


def deploy_host(host: str, bundle: Path, ssh: SshOptions | str | None = None, dry_run: bool = False, keep: int = 3,
                log=lambda host, msg: None, service: bool = False, trust_key: bool = False,
                add_key: bool = False, fresh_store: bool = False) -> HostResult:
    """Deploy one bundle to one host (with `service`, then install the agent's systemd unit); never
    raises, the result says what happened. The board carries its store to the new release (its kept
    samples re-embedded when the model changes), or with `fresh_store` gives it an empty one. With
    `trust_key`, a board that trusts no key first trusts
    the bundle's (once its signature checked out here); with `add_key` too, a board that trusts
    other keys trusts it beside them. Without, a board that would refuse the bundle's key is
    refused before the upload."""
    from edgemeta.boards import load_board_file

    info = bundle_info(bundle)
    release = release_id(bundle)
    store_flag = ["--fresh-store"] if fresh_store else []
    result = HostResult(host, False, release)
    step = result.stepper(log)

    try:
        signer = checked_signer(bundle) if trust_key else bundle_signer(bundle)
        remote = Remote(host, ssh)
        remote.install_ops()
        key = info.get("runtime") if isinstance(info.get("runtime"), str) else ""
        pre = remote.ops("preflight", release, *([key] if key else []), timeout=60)
        if pre["arch"] != info["arch"]:
            raise EdgemetaError(f"{host} is {pre['arch']}, the bundle is for {info['board']} ({info['arch']}); "
                                "build the bundle for this board's profile")
        if tuple(int(x) for x in pre["python"].split(".")[:2]) < (3, 10):
            raise EdgemetaError(f"{host} has Python {pre['python']}; edgemeta needs 3.10 or newer on the board")
        step(f"preflight: {pre['arch']}, Python {pre['python']}, {pre['free_mb']} MB free, active: {pre['current'] or 'none'}")
        state = pre.get("release", "absent")
        trusted = pre.get("trusted_keys", [])
        to_trust = signer if signer and trust_key and fingerprint(signer) not in trusted else None
        if signer and (state == "absent" or trust_key):  # an upload, or an explicit trust: would the board take the key?
            refusal = key_refusal(host, fingerprint(signer), trusted, trust_key, add_key)
            if refusal:
                raise EdgemetaError(("dry run: would fail: " if dry_run else "") + refusal)
        if state == "absent" and not pre.get("venv"):  # the board will make a venv: can it?
            wheelhouse = any(n.startswith("wheelhouse/") for n in info["files"])
            profile = load_board_file(bundle / "board.toml", info["board"]).raw
            problems = not_ready(doctor_on_host(host, ssh, profile, wheelhouse=wheelhouse, board_python=True))
            if problems:
                raise EdgemetaError(("dry run: would fail: " if dry_run else "not ready: ") + problems)
            step("doctor: the board can make the release's venv" + (" (offline, from the wheelhouse)" if wheelhouse else ""))
        if to_trust and dry_run:
            step(f"dry run: would trust signing key {fingerprint(to_trust)} (the bundle's) on this board"
                 + (f", beside {', '.join(trusted)}" if trusted else ""))
        elif to_trust:
            answer = remote.ops("trust", to_trust.hex(), *(["--add"] if trusted else []), timeout=60)
            result.trusted_key = answer["trusted"]
            step(f"trusted signing key {answer['trusted']} (the bundle's, sent over ssh) on this board from now on"
                 + (f", beside {', '.join(trusted)}" if trusted else ""))
        if state == "active":
            step(f"{release} is already active: nothing to do")
            result.ok, result.note = True, "already active"
        elif dry_run:
            step(f"dry run: would activate {release}, which is on the board already (health check, switch; no upload, "
                 "no install)" if state == "installed" else
                 f"dry run: would upload {release} ({len(info['files'])} files), verify, "
                 + ("link the runtime venv the board has" if pre.get("venv") else "install") + ", health-check and activate it")
            result.ok = True
            return result
        else:
            if state == "installed":
                step(f"{release} is on the board already: activating it without upload or install")
                act = remote.transact(["activate", release, str(keep), *store_flag], on_event=board_event(step))
                result.note = "activated the board's copy"
            else:
                act = remote.transact(["deploy", release, str(keep), *store_flag], bundle, on_event=board_event(step))
            step(f"activated (previous: {act['previous'] or 'none'}); health check through current passed")
            if act.get("warning"):
                step(f"warning: {act['warning']}")
        result.ok = True
        if service and not dry_run:
            step(install_service(remote))
    except EdgemetaError as e:
        result.error = str(e)
        result.ok = False
    return result


def install_service(remote: Remote) -> str:
    """Install and start the agent's systemd unit on a board (board_ops.py service); where the board
    runs no systemd, a warning that says how to start the agent instead."""
    answer = remote.ops("service", timeout=120)
    if answer["service"] == "no systemd":
        return (f"warning: no systemd on {remote.host}: the agent is not installed as a service; start it yourself (at boot, "
                f"from your init system): {answer['command']} (the unit for systemd is {answer['unit']})")
    return f"agent service enabled and started ({answer['unit']}): {answer['runs']}"


def check_trust_flags(trust_key: bool, add_key: bool) -> None:
    if add_key and not trust_key:
        raise EdgemetaError("--add-key trusts the bundle's key beside the keys a board trusts: give it with --trust-key")


def deploy_fleet(hosts: list[str], bundle: Path, ssh: SshOptions | str | None = None, dry_run: bool = False, parallel: int = 4,
                 log=lambda host, msg: None, service: bool = False, trust_key: bool = False,
                 add_key: bool = False, fresh_store: bool = False) -> list[HostResult]:
    """Deploy to many hosts with bounded concurrency; one bad host does not stop the others. A bad
    host name, ssh options ssh cannot use (SshOptions.checked), a bundle without a valid release id or
    (with `trust_key`) without a signature that checks out stops everything before any host is reached."""
    for h in hosts:
        check_host(h)
    ssh = as_ssh_options(ssh).checked()
    release_id(bundle)
    check_trust_flags(trust_key, add_key)
    if trust_key:
        checked_signer(bundle)
    return each_host(hosts, lambda h: deploy_host(h, bundle, ssh, dry_run, log=log, service=service, trust_key=trust_key,
                                                  add_key=add_key, fresh_store=fresh_store), parallel)


def deploy_release(hosts: list[str], bundle: str | Path | None = None, board: str | None = None, model: str | Path | None = None,
                   wheelhouse: bool = False, ssh: SshOptions | str | None = None, dry_run: bool = False, parallel: int = 4,
                   log=lambda host, msg: None, sign_key: str | Path | None = None, service: bool = False,
                   trust_key: bool = False, add_key: bool = False, fresh_store: bool = False) -> list[HostResult]:
    """`edgemeta deploy`: deploy a bundle already built, or one built here (in a temporary folder,
    signed with `sign_key`, default the user's) from `model` for the `board` profile, to every host
    (as deploy_fleet: `trust_key` to trust the bundle's key on a board that trusts none yet, with
    `add_key` on one that trusts others)."""
    import tempfile

    from edgemeta.deploy.bundle import build_bundle

    if not hosts:
        raise EdgemetaError(NO_HOSTS)
    for h in hosts:
        check_host(h)
    ssh = as_ssh_options(ssh).checked()
    check_trust_flags(trust_key, add_key)
    with tempfile.TemporaryDirectory() as tmp:
        if bundle:
            path = Path(bundle)
        elif board and model:
            path = build_bundle(board, model, Path(tmp) / "bundle", wheelhouse=wheelhouse, sign_key=sign_key,
                                log=lambda msg: log("bundle", msg))
        else:
            raise EdgemetaError("pass --bundle DIR, or --board NAME with --model DIR")
        return deploy_fleet(hosts, path, ssh, dry_run, parallel, log=log, service=service, trust_key=trust_key,
                            add_key=add_key, fresh_store=fresh_store)


def rollback_host(host: str, ssh: SshOptions | str | None = None, to: str = "", log=lambda host, msg: None,
                  fresh_store: bool = False) -> HostResult:
    """Roll one board back (or to release `to`, older or newer); never raises. The board checks the
    target before and after the switch and switches back when it fails."""
    result = HostResult(host, False)
    step = result.stepper(log)

    try:
        remote = Remote(host, ssh)
        remote.install_ops()
        r = remote.transact(["rollback", *([to] if to else []), *(["--fresh-store"] if fresh_store else [])],
                            on_event=board_event(step))
        result.ok, result.release = True, r["active"]
        result.note = r.get("note") or f"was {r['rolled_back_from'] or 'none'}"
        if not r.get("note"):
            step(f"active: {r['active']} (was {r['rolled_back_from'] or 'none'}); health check through current passed")
    except EdgemetaError as e:
        result.error = str(e)
    return result


def status_host(host: str, ssh: SshOptions | str | None = None) -> dict:
    """What one board runs (board_ops.py status: releases, history, health of current, store, space),
    with "host", "ok" and, when the board could not be asked, "error"; never raises."""
    try:
        remote = Remote(host, ssh)
        remote.install_ops()
        return {"host": host, "ok": True, **remote.ops("status", timeout=300)}
    except EdgemetaError as e:
        return {"host": host, "ok": False, "error": str(e)}


def doctor_on_host(host: str, ssh: SshOptions | str | None = None, profile: dict | None = None, wheelhouse: bool = False,
                   board_python: bool = False) -> list[dict]:
    """edgemeta/doctor.py's checks run on a board: the file goes over ssh to the active release's
    python (the board's python3 before the first deploy, or always with `board_python`: the one
    that makes venvs), with the board's root."""
    from edgemeta import doctor

    args = ["--json"] + (["--profile-json", json.dumps(profile)] if profile else []) + (["--wheelhouse"] if wheelhouse else [])
    pick = "" if board_python else '[ -x "$R/current/venv/bin/python" ] && P="$R/current/venv/bin/python"; '
    p = Remote(host, ssh).run(f'{ROOT_SH}; P=python3; {pick}exec "$P" - --root "$R" ' + shlex.join(args),
                                     input=Path(doctor.__file__).read_bytes(), timeout=120)
    err = p.stderr.decode(errors="replace").strip().splitlines()
    if p.returncode == 255:
        raise ssh_failure(host, p.stderr.decode(errors="replace"), ssh)
    try:
        return json.loads(p.stdout.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise EdgemetaError(f"doctor on {host} gave no answer: {err[-1] if err else 'no output'}") from None
