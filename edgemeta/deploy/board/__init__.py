"""Board-side release management, run over SSH with the board's own python3 (standard library only,
so it works before edgemeta is installed there). Deploy uploads it to the board first, built into one
zip application (edgemeta.deploy.board_ops.zipapp_bytes: this package with the shared
edgemeta.atomic and edgemeta.runtime.paths) as ~/.edgemeta-ops.pyz:

    python3 ~/.edgemeta-ops.pyz COMMAND [ARGS]     ROOT: $EDGEMETA_ROOT, else ~/.edgemeta

Modules: base (the one-line answers, names in ROOT), ed25519 and trust (who may sign a bundle),
receive (a bundle checked before it becomes a release), releases (venvs, install, health),
stores (the enrollment store carried between releases), lock, service (systemd),
lifecycle (activate, deploy, rollback, prune) and commands (the command table). Nothing here may
import anything but the standard library and those shared modules: tests/test_board_zipapp.py
runs the built application with no site-packages at all.

    ROOT/releases/<id>/        one bundle each; venv -> ../../venvs/<runtime key> once installed
    ROOT/releases/.<id>.partial  an upload in progress (removed by the next receive)
    ROOT/venvs/<key>/          a runtime venv (made here; <key>/.installed once complete), shared by the
                               releases whose BUNDLE.json names that runtime key: a model-only upgrade
                               reuses it (no pip); prune removes the ones no kept release links to
    ROOT/current -> releases/<id>   switched atomically (symlink renamed over the old one)
    ROOT/history.json          activated releases, oldest first; `current` is one of them (rollback steps
                               back through it, `rollback --to ID` jumps to any release on the board;
                               an activation drops the entries after current and appends its release)
    ROOT/stores/<id>/          the enrollment store of release <id>, made when <id> is activated from the
                               store being left: its kept samples re-embedded by <id>'s own edgemeta when
                               the model changed (`reenroll --out`), the same store when it did not. The
                               store being left is only read, so a rollback carries again (enrollments
                               made since come along); a store a later carry replaces goes to
                               ROOT/stores/.archive/, never deleted
    ROOT/releases/<id>/store -> ../../stores/<id>   so that switching `current` switches model and store at once
    ROOT/store -> current/store   the path the agent, `remote` and operators use (an older board's
                               ROOT/store folder becomes ROOT/stores/<current id> at its next activation)
    ROOT/trusted_keys/<fingerprint>.pub   ed25519 public keys (hex) that may sign bundles, each put
                               there by `trust KEYHEX` (over the host's ssh login, which is what
                               authenticates it: `edgemeta deploy --trust-key`); none at first, and
                               a board that trusts no key takes no bundle (no trust on first use)
    ROOT/edgemeta-agent.service  the agent's systemd unit (`service` installs it where systemd runs)
    ROOT/.lock                 held by the one command changing the board (deploy, activate, rollback, ...)

`deploy ID KEEP [--fresh-store]` is a whole deploy in one process, which goes on when the host's ssh
dies: receive the bundle from stdin, install its venv, carry the store to it (or, with --fresh-store,
give it an empty one: the old store stays where it is), health-check the new release with it, write
history.json and the agent's unit, switch `current`, check again through `current` (switching back if
that fails), prune. A store that cannot be carried (it kept no samples, or the new model takes
another input) stops the deploy before anything changed, saying so.
`current` never names a release whose health check has not passed; a release whose install or
check failed is removed at once. `activate ID [KEEP]` does the same for a release on the board;
`rollback [ID]` too (health check of the target, switch, check through `current`, switch back).

`receive` checks a bundle before it becomes a release folder, so nothing of it runs unchecked: its
BUNDLE.sig must be an ed25519 signature, by a trusted key, over SIGNED_PREFIX + BUNDLE.json (strict
verification: see ed25519_verify), and the folder must hold exactly the files BUNDLE.json lists (no
more, none missing), each with its sha256. Release ids match RELEASE_ID; a bundle that names its
release in BUNDLE.json must be that one. A board that trusts no key yet refuses every bundle, saying
how to trust yours.

`trust KEYHEX [--add]` trusts an ed25519 public key (64 hex digits) from now on, under the lock, in
one atomic write. It refuses a key no signer can have (not a canonical point, of small order, not in
the prime-order subgroup: public_key_problem), and, on a board that trusts other keys already, any
key unless --add says to trust it beside them. A key trusted already is no change.

Exit status: 0 ok, 3 refused (signature, checksum, an upload cut short, install, health, a full disk,
another deploy running, nothing to roll back), 2 usage. The last line of output is JSON for the host
to read; lines before it ({"event": ...}) say how far a deploy got.
"""
