"""The release life cycle, each a transaction under the board lock that goes on when the host's ssh
dies: `deploy ID KEEP` (receive, install, carry the store, health check, switch `current`, check
again through it, prune), `activate ID [KEEP]` for a release on the board, `rollback [ID]`, `prune
KEEP`. `current` never names a release whose health check has not passed."""

import json
import os
import shutil
from pathlib import Path

from edgemeta.deploy.board.base import STORES, Refused, done, root, say, write_text
from edgemeta.deploy.board.lock import lock_board, outlive_the_host
from edgemeta.deploy.board.receive import receive
from edgemeta.deploy.board.releases import (
    current,
    health,
    history,
    history_upto,
    install,
    installed,
    last_active,
    on_board,
    release_arg,
    remove_half_built,
    remove_unused_venvs,
    switch,
    venv_link,
)
from edgemeta.deploy.board.service import agent_user, restart_agent, unwritable
from edgemeta.deploy.board.stores import (
    archive_store,
    commit_store,
    discard_store,
    prepare_store,
    release_store_lock,
    settle_stores,
    store_of,
)


def keep_arg(keep: str) -> int:
    if not keep.isdigit() or int(keep) < 1:
        done({"error": f"prune: keep must be a whole number of releases, 1 or more, not {keep[:20]!r}"}, 2)
    return int(keep)


def store_arg(flag: str) -> bool:
    if flag not in ("", "--fresh-store"):
        done({"error": f"expected --fresh-store or nothing, not {flag[:40]!r}"}, 2)
    return flag == "--fresh-store"


def checked_with_store(release_id: str, fresh_store: bool, carry: bool = True) -> tuple[dict, Path | None]:
    """The release's health check with the store carried to it (prepare_store; not when `carry` is
    false: the release is already current and has its store): (the check, the prepared store or None).
    A refusal discards the prepared store, so the caller has only its own clean-up to do."""
    work = None
    try:
        if carry:
            info, work = prepare_store(release_id, fresh_store)
            say("store", release=release_id, **info)
        return health(release_id, store=work), work
    except Refused:
        if work is not None:
            discard_store(work)
        raise


def activate(release_id: str, fresh: bool, fresh_store: bool = False) -> dict:
    """The transaction (under the lock): install (when not yet), carry the store to the release (see
    prepare_store), health-check the release itself with it, write its history entry and unit, switch
    `current` atomically (model and store together), check again through `current`. `current` never
    names an unchecked release: a failure before the switch leaves the board as it was (a release
    this deploy brought, `fresh`, or installed is removed), one after it switches back."""
    user, group = agent_user()
    stores = root() / STORES
    blocked = unwritable(stores)
    if blocked:  # the agent runs as this user and writes the store: say so now, not when it first enrolls
        raise Refused(f"{blocked[0]} is not writable by {user}, who the agent runs as: sudo chown -R {user}: {stores}")
    previous = current()
    made = ""
    try:
        made = install(release_id)
        if made:
            say("installed", release=release_id, venv=made, key=venv_link(release_id))
        checked, work = checked_with_store(release_id, fresh_store, carry=release_id != previous)
    except Refused as e:
        if (fresh or made) and release_id != previous:
            shutil.rmtree(root() / "releases" / release_id, ignore_errors=True)
            remove_unused_venvs()
        kept = f"{previous} stays active" if previous else "no release is active"
        raise Refused(f"{e}; {kept}" + (f", {release_id} was removed" if (fresh or made) and release_id != previous else "")) from None
    say("healthy", **checked)
    answer = {"active": release_id, "previous": previous, "installed": made}
    if release_id == previous:
        return {**answer, "note": "already active"}
    try:
        unit = root() / "releases" / release_id / "edgemeta-agent.service"
        if unit.exists():  # ready for `sudo cp ROOT/edgemeta-agent.service /etc/systemd/system/`
            text = unit.read_text().replace("@ROOT@", str(root().resolve())).replace("@USER@", user).replace("@GROUP@", group)
            write_text(root() / "edgemeta-agent.service", text)  # the same for every release: it runs ROOT/current
            if os.getuid() == 0:
                answer["warning"] = ("the agent's systemd unit runs as root because this deploy logs in as root; "
                                     "deploy as an unprivileged user (such as pi@board) instead")
        upto = history_upto(previous)
        switch_checked(release_id, previous, [x for x in upto if x != release_id] + [release_id], work)
    except BaseException:
        if work is not None and work.exists():  # failed before its store was put in place
            discard_store(work)
        raise
    return answer


def switch_checked(release_id: str, previous: str, after: list, store: Path | None = None) -> None:
    """Write history.json as `after`, put `release_id`'s prepared `store` in place (commit_store), switch
    `current` to `release_id` (whose own health check passed) and check it again through `current`, the
    path the agent takes; on a failure switch back to `previous` with the history as it was. Killed
    anywhere, `current` is `previous` or `release_id`, both checked."""
    before = history()
    if after != before:
        write_text(root() / "history.json", json.dumps(after))  # (entries after current: harmless, see history.json)
    if store is not None:
        commit_store(release_id, store)
    switch(release_id)
    try:
        settle_stores()  # ROOT/store -> current/store, on the first activation
        health(release_id, through=str(root() / "current"))
    except Refused as e:
        if previous:
            switch(previous)
            write_text(root() / "history.json", json.dumps(before))
        raise Refused(f"{e} (through current, after the switch); " + (f"switched back to {previous}" if previous else
                                                                       "no earlier release to switch back to")) from None
    finally:
        release_store_lock()  # an enroll that waited now meets the new store (and is refused by the old model)
    restart_agent()


def cmd_activate(release_id: str, keep: str = "", store: str = "") -> None:
    """Activate a release that is on the board (received, perhaps installed); with KEEP, prune after."""
    if keep == "--fresh-store":
        keep, store = "", keep
    release_id, n, fresh_store = release_arg(release_id), keep_arg(keep) if keep else 0, store_arg(store)
    lock_board()
    outlive_the_host()
    remove_half_built(spare=release_id)
    answer = activate(release_id, fresh=False, fresh_store=fresh_store)
    done({**answer, "pruned": prune(n)} if n else answer)


def cmd_deploy(release_id: str, keep: str, store: str = "") -> None:
    """The whole deploy of one board, in this one process so that a dying host cannot leave it half done:
    receive the bundle (a tar stream on stdin), then activate it (see `activate`), then prune to KEEP."""
    release_id, n, fresh_store = release_arg(release_id), keep_arg(keep), store_arg(store)
    lock_board()
    outlive_the_host()
    remove_half_built()
    got = receive(release_id)
    say("received", **got)
    done({**activate(release_id, fresh="note" not in got, fresh_store=fresh_store), "pruned": prune(n)})


def cmd_rollback(to: str = "", store: str = "") -> None:
    """Switch to the release activated before `current` (one step back through history.json, which
    stays as it is, so a second rollback goes one further), or to release `to`, older or newer (roll
    forward), if it is on the board. The target is health-checked before the switch and through
    `current` after it (switching back if that fails): `current` is never an unchecked release."""
    if to == "--fresh-store":
        to, store = "", to
    fresh_store, target = store_arg(store), release_arg(to) if to else ""
    lock_board()
    outlive_the_host()
    remove_half_built(spare=target)
    now, h = current(), history()
    others = [x for x in on_board() if x != now and installed(x)]
    if target:
        if target == now:
            done({"active": now, "rolled_back_from": now, "note": "already active"})
        if target not in others:
            on = [f"{x} (active)" if x == now else x for x in on_board() if x == now or installed(x)]
            raise Refused(f"release {target} is not on this board" + (f"; on it: {', '.join(on)}" if on else ""))
    else:
        older = [x for x in (h[: h.index(now)] if now in h else h) if x in others]
        if not older:
            raise Refused("no earlier release to roll back to" + (f"; on the board: {', '.join(others)} (rollback --to ID)"
                                                                  if others else ""))
        target = older[-1]
    try:
        checked, work = checked_with_store(target, fresh_store)
    except Refused as e:
        raise Refused(f"{e}; {now or 'no release'} stays active") from None
    say("healthy", **checked)
    try:
        switch_checked(target, now, h if target in h else history_upto(now) + [target], work)
    except BaseException:
        if work.exists():
            discard_store(work)
        raise
    done({"active": target, "rolled_back_from": now, "healthy": checked})


def prune(keep: int) -> list[str]:
    """Remove releases beyond the `keep` most recently active ones (current among them; a release left
    by `rollback --to` counts as recent, however old it is in history.json), then the venvs no remaining
    release uses. Under the lock."""
    now, h = current(), history()
    recent = sorted(on_board(), key=lambda x: (last_active(x), h.index(x) if x in h else -1), reverse=True)
    keep_set = set(recent[:keep]) | {now}
    removed = []
    for name in on_board():
        if name not in keep_set:
            shutil.rmtree(root() / "releases" / name, ignore_errors=True)
            if store_of(name).is_dir():  # its enrollments went on to the releases after it; kept all the same
                archive_store(store_of(name), "pruned")
            removed.append(name)
    return removed + [f"venvs/{v}" for v in remove_unused_venvs()]


def cmd_prune(keep: str) -> None:
    n = keep_arg(keep)
    lock_board()
    done({"removed": prune(n)})

