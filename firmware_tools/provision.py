"""Provision a Raspberry Pi OS (bookworm) boot partition before the card's first boot.

Works on the MOUNTED boot partition (``bootfs``, e.g. ``/media/$USER/bootfs``), which is
``/boot/firmware`` on the running board. What it writes, and who reads it on the board:

- ``config.txt``: ``enable_uart=1`` (firmware), and for ``coral="pcie"`` ``dtparam=pciex1`` and
  ``kernel=kernel8.img``. Always inside an ``[all]`` section, so a model filter such as ``[cm5]``
  at the end of the file cannot swallow them.
- ``cmdline.txt`` (ONE line of kernel arguments): ``console=serial0,115200`` and the three
  tokens that make systemd run ``firstrun.sh`` once instead of the normal boot, then reboot.
- ``ssh``: an empty file; ``sshswitch.service`` enables the SSH server at boot.
- ``userconf.txt``: ``user:sha512-crypt-hash``, the first user (bookworm has no default user).
- ``firstrun.sh``: removes its own ``cmdline.txt`` tokens first (so a failure cannot loop),
  creates the user from ``userconf.txt``, sets the hostname (``/etc/hostname``, ``/etc/hosts``),
  installs the SSH key and, for a Coral USB Accelerator, the udev rules and ``plugdev`` group.
- ``99-edgetpu-accelerator.rules`` (``coral="usb"``): copied to ``/etc/udev/rules.d`` by firstrun.sh.

Everything is validated before anything is written; each file is replaced atomically (temp file
in the same folder, fsync, rename) and ``cmdline.txt`` is written last, so it never points at a
script that is not there yet. A second run with the same arguments changes nothing and returns [].

>>> from pathlib import Path
>>> provision(Path("/media/me/bootfs"), hostname="cam-1", user="pi", password="s3cret",
...           ssh_pubkey=Path("~/.ssh/id_ed25519.pub").expanduser().read_text(),
...           coral="usb")                                                    # doctest: +SKIP
['userconf.txt: first user pi (SHA-512 crypt password)', ...]
"""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from edgemeta.atomic import write_atomic
from firmware_tools.firstrun import FIRSTRUN_MARKER, FIRSTRUN_TOKENS, USB_RULES_NAME, firstrun_script

__all__ = ["ProvisionError", "provision", "CORAL_CHOICES", "FIRSTRUN_TOKENS"]

CORAL_CHOICES = ("pcie", "usb")
SERIAL_CONSOLE = "console=serial0,115200"
# present on a never-booted image: the first boot resizes the root file system, then drops it
FRESH_IMAGE_TOKEN = "init=/usr/lib/raspberrypi-sys-mods/firstboot"
USB_RULES = """\
# Coral USB Accelerator (written by edgemeta firmware_tools). It enumerates as 1a6e:089a
# (Global Unichip) until the first inference loads its firmware, then as 18d1:9302 (Google).
SUBSYSTEMS=="usb", ATTRS{idVendor}=="1a6e", ATTRS{idProduct}=="089a", MODE="0664", GROUP="plugdev"
SUBSYSTEMS=="usb", ATTRS{idVendor}=="18d1", ATTRS{idProduct}=="9302", MODE="0664", GROUP="plugdev"
"""
SSH_KEY_TYPES = frozenset({
    "ssh-ed25519", "ssh-rsa", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com", "sk-ecdsa-sha2-nistp256@openssh.com",
})
_HOSTNAME_RE = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")  # one RFC 1123 label
_USER_RE = re.compile(r"[a-z_][a-z0-9_-]{0,31}")  # Debian's default NAME_REGEX, 32 chars max
_SECTION_RE = re.compile(r"\s*\[([^\]]*)\]")


class ProvisionError(Exception):
    """The boot folder or an argument is unusable; the message is one line that says how to fix it."""


def provision(
    boot: Path,
    *,
    hostname: str,
    user: str,
    password: str | None = None,
    ssh_pubkey: str | None = None,
    enable_ssh: bool = True,
    uart_console: bool = True,
    coral: str | None = None,
) -> list[str]:
    """Make the mounted boot partition ``boot`` come up headless and reachable; return what changed.

    ``password=None`` leaves ``userconf.txt`` alone (refused on a never-booted image, which
    needs it to create the first user). ``enable_ssh=False`` does not create ``ssh`` (an
    existing one is left alone). ``uart_console=False`` leaves the UART settings alone.
    ``coral`` is None, ``"pcie"`` (M.2 / Mini PCIe Coral on a Pi 5 PCIe HAT) or ``"usb"``.
    """
    boot = Path(boot)
    config_path, cmdline_path = boot / "config.txt", boot / "cmdline.txt"
    if not (boot.is_dir() and config_path.is_file() and cmdline_path.is_file()):
        raise ProvisionError(f"{boot} does not look like a Raspberry Pi boot partition (no config.txt or cmdline.txt); "
                             "pass the folder where the card's 'bootfs' partition is mounted")
    # 1. validate everything and compute every new file before writing any
    _check_user(user)
    _check_hostname(hostname)
    key = _check_ssh_key(ssh_pubkey) if ssh_pubkey is not None else None
    if password is not None:
        _check_password(password)
    if coral is not None and coral not in CORAL_CHOICES:
        raise ProvisionError(f"unknown coral={coral!r}; use 'pcie' (M.2/Mini PCIe on a Pi 5 HAT), 'usb' (USB Accelerator) or None")

    cmdline_text = _read_text(cmdline_path)
    tokens, cmdline_eol = _parse_cmdline(cmdline_text)
    userconf_path = boot / "userconf.txt"
    if password is None and not userconf_path.exists() and FRESH_IMAGE_TOKEN in tokens:
        raise ProvisionError("this image has never booted and has no userconf.txt, so it would stop at first boot to ask "
                             "for a user: pass a password")
    if password is None and userconf_path.exists():
        existing_user = _read_text(userconf_path).partition(":")[0].strip()
        if existing_user != user:
            raise ProvisionError(f"userconf.txt creates user {existing_user!r}, not {user!r}: pass a password to replace it")

    plan: list[_Write] = []  # in write order; cmdline.txt goes last
    if password is not None:
        current = _read_text(userconf_path) if userconf_path.exists() else ""
        if not _userconf_matches(current, user, password):
            plan.append(_Write(userconf_path, f"{user}:{_sha512_crypt(password)}\n",
                               f"userconf.txt: first user {user} (SHA-512 crypt password)", mode=0o600))
    ssh_path = boot / "ssh"
    if enable_ssh and not ssh_path.exists():
        plan.append(_Write(ssh_path, "", "ssh: created (SSH server enabled at boot)"))
    if coral == "usb":
        rules_path = boot / USB_RULES_NAME
        if not rules_path.exists() or _read_text(rules_path) != USB_RULES:
            plan.append(_Write(rules_path, USB_RULES,
                               f"{USB_RULES_NAME}: udev rules for the Coral USB Accelerator (1a6e:089a, 18d1:9302); "
                               f"firstrun.sh installs them in /etc/udev/rules.d and adds {user} to group plugdev"))
    firstrun_path = boot / "firstrun.sh"
    script = firstrun_script(hostname=hostname, user=user, key=key, enable_ssh=enable_ssh, coral_usb=coral == "usb")
    old_script = _read_text(firstrun_path) if firstrun_path.exists() else None
    if old_script is not None and FIRSTRUN_MARKER not in old_script:
        raise ProvisionError(f"{firstrun_path} exists and was not written by edgemeta (Raspberry Pi Imager customisation?); "
                             "move it away, or customise in Imager only")
    if old_script != script:
        what = f"hostname {hostname}" + (f", SSH key for {user}" if key else "") + (", Coral USB udev rules" if coral == "usb" else "")
        plan.append(_Write(firstrun_path, script, f"firstrun.sh: runs once at first boot ({what})", mode=0o755))

    config_text = _read_text(config_path)
    new_config, config_changes = _edit_config(config_text, _config_settings(uart_console, coral))
    if config_changes:
        plan.append(_Write(config_path, new_config, "config.txt: " + "; ".join(config_changes)))
    new_tokens, cmd_changes = _edit_cmdline(tokens, uart_console)
    if cmd_changes:
        plan.append(_Write(cmdline_path, " ".join(new_tokens) + cmdline_eol, "cmdline.txt: " + "; ".join(cmd_changes)))

    # 2. write
    for w in plan:
        _write_atomic(w.path, w.text.encode(), w.mode)
    changes = [w.change for w in plan]
    if coral == "pcie" and any("pciex1" in c or "kernel8" in c for c in config_changes):
        # said once, when the PCIe settings are added; the rest needs the network, after boot
        changes.append("note: after boot install gasket-dkms and libedgetpu1-std (Coral apt repository) for /dev/apex_0")
    return changes


# ---------------------------------------------------------------- validation


def _check_user(user: str) -> None:
    if not user or ":" in user or "\n" in user or "\r" in user:
        raise ProvisionError(f"bad user name {user!r}: it must not be empty or contain ':' or a newline")
    if not _USER_RE.fullmatch(user) or user == "root":
        raise ProvisionError(f"bad user name {user!r}: use lower-case letters, digits, '_' or '-' (not 'root'), 32 characters at most")


def _check_password(password: str) -> None:
    if not password or ":" in password or "\n" in password or "\r" in password:
        raise ProvisionError("bad password: it must not be empty or contain ':' or a newline")


def _check_hostname(hostname: str) -> None:
    if not _HOSTNAME_RE.fullmatch(hostname):
        raise ProvisionError(f"bad hostname {hostname!r}: use 1-63 letters, digits or '-', not starting or ending with '-' (RFC 1123)")


def _check_ssh_key(key: str) -> str:
    """Return the key as one clean line (a .pub file's trailing newline is fine)."""
    key = key.strip()
    if "PRIVATE KEY" in key:
        raise ProvisionError("ssh_pubkey looks like a PRIVATE key; pass the .pub file's contents")
    if not key or "\n" in key or "\r" in key or not key.isprintable():
        raise ProvisionError("bad ssh_pubkey: it must be one printable line 'TYPE BASE64 [comment]'")
    parts = key.split(None, 2)
    if parts[0] not in SSH_KEY_TYPES or len(parts) < 2:
        raise ProvisionError(f"bad ssh_pubkey: it must start with one of {', '.join(sorted(SSH_KEY_TYPES))} and the base64 key")
    try:
        blob = base64.b64decode(parts[1], validate=True)
    except ValueError:
        raise ProvisionError("bad ssh_pubkey: the key part is not base64") from None
    # the blob repeats the key type (uint32 length + name): catches truncated or mixed-up keys
    n = int.from_bytes(blob[:4], "big")
    if blob[4:4 + n] != parts[0].encode():
        raise ProvisionError(f"bad ssh_pubkey: the base64 key does not match its type {parts[0]} (truncated or edited?)")
    return key


# ---------------------------------------------------------------- userconf.txt


def _crypt_module() -> ModuleType | None:
    """The stdlib crypt module, or None (removed in Python 3.13; tests replace this function)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            import crypt
        except ImportError:
            return None
    return crypt


def _sha512_crypt(password: str, setting: str | None = None) -> str:
    """SHA-512 crypt of ``password``, with a new salt, or with the salt of ``setting`` (to verify)."""
    mod = _crypt_module()
    if mod is not None:
        hashed = mod.crypt(password, setting or mod.mksalt(mod.METHOD_SHA512))
    else:
        hashed = _openssl_crypt(password, setting)
    if not hashed or not hashed.startswith("$"):
        raise ProvisionError("could not hash the password (crypt returned nothing); install openssl")
    return hashed


def _openssl_crypt(password: str, setting: str | None) -> str:
    method, salt = "6", None
    if setting is not None:
        bits = setting.split("$")
        if len(bits) < 4 or bits[1] not in ("5", "6") or bits[2].startswith("rounds="):
            return ""  # a format openssl cannot reproduce: treated as "does not match"
        method, salt = bits[1], bits[2]
    exe = shutil.which("openssl")
    if exe is None:
        raise ProvisionError("cannot hash the password: Python's crypt module is missing (Python >= 3.13) and openssl is not installed")
    args = [exe, "passwd", f"-{method}", "-stdin"] + (["-salt", salt] if salt else [])
    # the password goes through stdin, never the argument list (visible in ps)
    proc = subprocess.run(args, input=password + "\n", capture_output=True, text=True, timeout=60, check=False)
    if proc.returncode != 0:
        raise ProvisionError(f"openssl passwd failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}")
    return proc.stdout.strip()


def _userconf_matches(text: str, user: str, password: str) -> bool:
    """True if userconf.txt already holds ``user`` with this password (a new salt would rewrite it each run)."""
    name, sep, hashed = text.strip().partition(":")
    if not sep or name != user or not hashed.startswith("$"):
        return False
    try:
        return _sha512_crypt(password, hashed) == hashed
    except ProvisionError:  # a hash format this machine cannot reproduce: write a new one
        return False


# ---------------------------------------------------------------- config.txt


@dataclass(frozen=True)
class _Setting:
    line: str  # what to add, e.g. "enable_uart=1"
    comment: str
    # looks at one unconditional line's value for this key: "ok", "wrong" or None (not about this setting)
    judge: Callable[[str, str], str | None]


def _key_equals(key: str, value: str) -> Callable[[str, str], str | None]:
    def judge(k: str, v: str) -> str | None:
        return None if k != key else ("ok" if v == value else "wrong")
    return judge


def _dtparam_on(param: str) -> Callable[[str, str], str | None]:
    def judge(k: str, v: str) -> str | None:
        if k != "dtparam":
            return None
        # one dtparam line may set several parameters: "dtparam=pciex1,pciex1_gen=3"
        for item in v.split(","):
            name, _, val = item.strip().partition("=")
            if name == param and val in ("", "on", "true", "yes", "1"):
                return "ok"
        return None
    return judge


def _config_settings(uart_console: bool, coral: str | None) -> list[_Setting]:
    out = []
    if uart_console:
        out.append(_Setting("enable_uart=1", "serial console on the primary UART (/dev/serial0)",
                            _key_equals("enable_uart", "1")))
    if coral == "pcie":
        out.append(_Setting("dtparam=pciex1", "Coral M.2 / Mini PCIe on a Pi 5 PCIe HAT: enable the external PCIe x1 connector",
                            _dtparam_on("pciex1")))
        out.append(_Setting("kernel=kernel8.img",
                            "the Coral gasket/apex driver needs a 4K-page kernel; a Pi 5 boots kernel_2712.img (16K pages) by default",
                            _key_equals("kernel", "kernel8.img")))
    return out


def _edit_config(text: str, settings: list[_Setting]) -> tuple[str, list[str]]:
    """Return (new text, changes). Only lines that apply to every board count: the ones before the
    first section header or after an ``[all]``; the last such line of a key is the one that wins."""
    eol = "\r\n" if "\r\n" in text else "\n"
    lines = text.splitlines()
    unconditional, changes, missing = [], [], []
    scope_all = True
    for i, raw in enumerate(lines):
        m = _SECTION_RE.match(raw)
        if m:
            scope_all = m.group(1).strip().lower() == "all"
            continue
        s = raw.strip()
        if scope_all and s and not s.startswith("#") and "=" in s:
            k, _, v = s.partition("=")
            unconditional.append((i, k.strip(), v.strip()))
    for setting in settings:
        verdicts = [(i, setting.judge(k, v)) for i, k, v in unconditional]
        verdicts = [(i, verdict) for i, verdict in verdicts if verdict is not None]
        if verdicts and verdicts[-1][1] == "ok":
            continue
        if verdicts:  # the winning line has another value: fix it in place
            i = verdicts[-1][0]
            changes.append(f"{lines[i].strip()} -> {setting.line}")
            lines[i] = setting.line
        else:
            missing.append(setting)
    if missing:
        if not scope_all:  # the file ends inside a model filter such as [cm5]
            lines += ["", "[all]"]
        elif lines and lines[-1].strip() and not _SECTION_RE.match(lines[-1]):
            lines.append("")
        for setting in missing:
            lines += [f"# edgemeta: {setting.comment}", setting.line]
            changes.append(f"added {setting.line} (in [all])")
    return eol.join(lines) + eol, changes


# ---------------------------------------------------------------- cmdline.txt


def _parse_cmdline(text: str) -> tuple[list[str], str]:
    """Tokens of the single line, and the line ending to keep (the file may or may not have one)."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if len(lines) > 1:
        raise ProvisionError(f"cmdline.txt has {len(lines)} lines but the kernel reads only the first; join them into one line")
    eol = "\r\n" if text.endswith("\r\n") else "\n" if text.endswith("\n") else ""
    return (lines[0].split() if lines else []), eol


def _edit_cmdline(tokens: list[str], uart_console: bool) -> tuple[list[str], list[str]]:
    tokens, changes = list(tokens), []
    if uart_console:
        serial = [i for i, t in enumerate(tokens) if t.startswith("console=serial0")]
        if not serial:
            # before console=tty1: the LAST console= becomes /dev/console, which stays the screen
            tokens.insert(0, SERIAL_CONSOLE)
            changes.append(f"added {SERIAL_CONSOLE}")
        elif tokens[serial[0]] != SERIAL_CONSOLE:
            changes.append(f"{tokens[serial[0]]} -> {SERIAL_CONSOLE}")
            tokens[serial[0]] = SERIAL_CONSOLE
        for i in reversed(serial[1:]):  # duplicates
            changes.append(f"removed duplicate {tokens.pop(i)}")
    for want in FIRSTRUN_TOKENS:
        key = want.partition("=")[0] + "="
        have = [i for i, t in enumerate(tokens) if t.startswith(key)]
        if have and tokens[have[0]] == want:
            continue
        if have:
            old = tokens[have[0]]
            if key == "systemd.run=" and Path(old.partition("=")[2]).name != "firstrun.sh":
                raise ProvisionError(f"cmdline.txt already runs another first-boot program ({old}); remove that token first")
            tokens[have[0]] = want
            changes.append(f"{old} -> {want}")
        else:
            tokens.append(want)
            changes.append(f"added {want}")
    return tokens, changes


# ---------------------------------------------------------------- files


@dataclass(frozen=True)
class _Write:
    path: Path
    text: str
    change: str
    mode: int = 0o644


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise ProvisionError(f"{path} is not UTF-8 text; is this really a boot partition?") from None
    except OSError as e:
        raise ProvisionError(f"cannot read {path}: {e.strerror}") from None


def _write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data``: a crash leaves either the old file or the new one, never half of one
    (FAT has no permission bits: `mode` is applied where it can be)."""
    write_atomic(path, data, mode=mode)
