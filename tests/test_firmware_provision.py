"""Boot-partition provisioning on a folder laid out like a fresh Raspberry Pi OS bookworm ``bootfs``."""

from __future__ import annotations

import base64
import os
import shutil
import stat
import subprocess
import warnings
from pathlib import Path

import pytest

from firmware_tools import provision as prov
from firmware_tools.provision import FIRSTRUN_TOKENS, ProvisionError, provision

# config.txt as shipped in the 2024/2025 bookworm images (it ends with an [all] section)
BOOKWORM_CONFIG = """\
# For more options and information see
# http://rptl.io/configtxt
# Some settings may impact device functionality. See link above for details

# Uncomment some or all of these to enable the optional hardware interfaces
#dtparam=i2c_arm=on
#dtparam=i2s=on
#dtparam=spi=on

# Enable audio (loads snd_bcm2835)
dtparam=audio=on

# Automatically load overlays for detected cameras
camera_auto_detect=1

# Automatically load overlays for detected DSI displays
display_auto_detect=1

# Automatically load initramfs files, if found
auto_initramfs=1

# Enable DRM VC4 V3D driver
dtoverlay=vc4-kms-v3d
max_framebuffers=2

# Don't have the firmware create an initial video= setting in cmdline.txt.
# Use the kernel's default instead.
disable_fw_kms_setup=1

# Run in 64-bit mode
arm_64bit=1

# Disable compatibility for older Raspberry Pi models
disable_overscan=1

# Run as fast as firmware / video / DSI display allow
arm_boost=1

[cm4]
# Enable host mode on the 2711 built-in XHCI USB controller.
otg_mode=1

[cm5]
dtoverlay=dwc2,dr_mode=host

[all]
"""
# the fresh image's one line (no serial console yet: some images ship without it)
BOOKWORM_CMDLINE = ("console=tty1 root=PARTUUID=4e639091-02 rootfstype=ext4 fsck.repair=yes rootwait quiet "
                    "init=/usr/lib/raspberrypi-sys-mods/firstboot splash plymouth.ignore-serial-consoles\n")


def _pubkey(kind: str = "ssh-ed25519", comment: str = "me@laptop") -> str:
    name = kind.encode()
    blob = len(name).to_bytes(4, "big") + name + (32).to_bytes(4, "big") + bytes(range(32))
    return f"{kind} {base64.b64encode(blob).decode()} {comment}\n"


KEY = _pubkey()


@pytest.fixture
def boot(tmp_path: Path) -> Path:
    d = tmp_path / "root" / "boot" / "firmware"  # a fake root, so firstrun.sh can run against it
    d.mkdir(parents=True)
    (d / "config.txt").write_text(BOOKWORM_CONFIG)
    (d / "cmdline.txt").write_text(BOOKWORM_CMDLINE)
    (d / "overlays").mkdir()
    return d


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def check_crypt(password: str, hashed: str) -> bool:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            import crypt
        except ImportError:  # Python >= 3.13: verify with openssl instead
            return prov._openssl_crypt(password, hashed) == hashed
    return crypt.crypt(password, hashed) == hashed


def all_section_lines(config: str) -> list[str]:
    """Lines that apply to every board: before the first filter, or after an [all]."""
    out, scope_all = [], True
    for line in config.splitlines():
        if line.startswith("["):
            scope_all = line.strip() == "[all]"
        elif scope_all:
            out.append(line)
    return out


def test_fresh_image(boot: Path):
    changes = provision(boot, hostname="cam-1", user="pi", password="s3cret pass", ssh_pubkey=KEY)
    assert len(changes) == 5 and all("\n" not in c for c in changes)
    assert [c.split(":")[0] for c in changes] == ["userconf.txt", "ssh", "firstrun.sh", "config.txt", "cmdline.txt"]

    config = (boot / "config.txt").read_text()
    assert config.startswith(BOOKWORM_CONFIG)  # appended to the trailing [all]: nothing else moved
    assert config.count("[all]") == 1 and "enable_uart=1" in all_section_lines(config)

    cmdline = (boot / "cmdline.txt").read_text()
    assert cmdline.endswith("\n") and cmdline.count("\n") == 1
    tokens = cmdline.split()
    assert tokens[0] == "console=serial0,115200" and tokens.index("console=serial0,115200") < tokens.index("console=tty1")
    assert tokens[1:-3] == BOOKWORM_CMDLINE.split() and tuple(tokens[-3:]) == FIRSTRUN_TOKENS

    assert (boot / "ssh").read_bytes() == b""
    user, hashed = (boot / "userconf.txt").read_text().rstrip("\n").split(":")
    assert user == "pi" and hashed.startswith("$6$") and check_crypt("s3cret pass", hashed)
    script = (boot / "firstrun.sh").read_text()
    assert "NEW_HOSTNAME=cam-1" in script and f"SSH_KEY='{KEY.strip()}'" in script
    assert os.stat(boot / "firstrun.sh").st_mode & 0o111
    assert not list(boot.glob(".*.tmp"))


def test_second_run_changes_nothing(boot: Path):
    kwargs = dict(hostname="cam-1", user="pi", password="s3cret", ssh_pubkey=KEY, coral="pcie")
    assert provision(boot, **kwargs)
    before = snapshot(boot)
    assert provision(boot, **kwargs) == []
    assert snapshot(boot) == before
    # a changed argument changes only what depends on it
    changes = provision(boot, **{**kwargs, "hostname": "cam-2"})
    assert [c.split(":")[0] for c in changes] == ["firstrun.sh"]


@pytest.mark.parametrize("use_crypt", [True, False], ids=["crypt", "openssl"])
def test_password_hash(boot: Path, monkeypatch, use_crypt: bool):
    calls: list[list[str]] = []
    real_run = subprocess.run

    def spy(args, **kw):
        calls.append(list(args))
        return real_run(args, **kw)

    monkeypatch.setattr(prov.subprocess, "run", spy)
    if not use_crypt:
        if shutil.which("openssl") is None:
            pytest.skip("openssl is not installed")
        monkeypatch.setattr(prov, "_crypt_module", lambda: None)
    provision(boot, hostname="cam-1", user="edge", password="pa ss$word'\"")
    user, hashed = (boot / "userconf.txt").read_text().strip().split(":", 1)
    assert user == "edge" and hashed.startswith("$6$") and check_crypt("pa ss$word'\"", hashed)
    if use_crypt:
        assert calls == []
    else:  # the password travelled through stdin, never through the argument list
        assert calls and all(not any("word" in a for a in c) for c in calls) and calls[0][1:4] == ["passwd", "-6", "-stdin"]
    # verified against the existing salt: the same password is no change, another one is
    assert provision(boot, hostname="cam-1", user="edge", password="pa ss$word'\"") == []
    assert provision(boot, hostname="cam-1", user="edge", password="other")[0].startswith("userconf.txt")


def test_config_ending_in_a_model_filter(boot: Path):
    # the Pi 4 filter at the end would swallow a line appended there; a wrong value in the common part is fixed in place
    text = "enable_uart=0\ndtparam=audio=on\n[pi4]\nenable_uart=1\narm_boost=1\n"
    (boot / "config.txt").write_text(text)
    changes = provision(boot, hostname="cam-1", user="pi", password="x", coral="pcie")
    config = (boot / "config.txt").read_text()
    assert config.startswith("enable_uart=1\ndtparam=audio=on\n[pi4]\nenable_uart=1\narm_boost=1\n\n[all]\n")
    common = all_section_lines(config)
    assert {"enable_uart=1", "dtparam=pciex1", "kernel=kernel8.img"} <= set(common)
    assert any("4K-page" in line for line in common if line.startswith("#"))
    config_change = next(c for c in changes if c.startswith("config.txt: "))
    assert "enable_uart=0 -> enable_uart=1; added dtparam=pciex1 (in [all])" in config_change
    assert changes[-1].startswith("note: ") and "gasket" in changes[-1]
    assert provision(boot, hostname="cam-1", user="pi", password="x", coral="pcie") == []


def test_config_settings_already_there_in_other_spellings(boot: Path):
    text = "dtparam=audio=on,pciex1=on\nkernel=kernel_2712.img\nenable_uart=1\n"
    (boot / "config.txt").write_text(text)
    changes = provision(boot, hostname="cam-1", user="pi", password="x", coral="pcie")
    config_change = next(c for c in changes if c.startswith("config.txt"))
    assert config_change == "config.txt: kernel=kernel_2712.img -> kernel=kernel8.img"
    assert (boot / "config.txt").read_text() == "dtparam=audio=on,pciex1=on\nkernel=kernel8.img\nenable_uart=1\n"


def test_cmdline_without_newline_crlf_and_old_values(boot: Path):
    (boot / "cmdline.txt").write_text("console=serial0,9600 console=serial0,9600 root=/dev/mmcblk0p2 rootwait "
                                      "systemd.run=/boot/firstrun.sh")
    changes = provision(boot, hostname="cam-1", user="pi", password="x")
    cmdline = (boot / "cmdline.txt").read_text()
    assert "\n" not in cmdline  # the file had no line end: it still has none
    assert cmdline.split() == ["console=serial0,115200", "root=/dev/mmcblk0p2", "rootwait", *FIRSTRUN_TOKENS]
    assert "cmdline.txt: console=serial0,9600 -> console=serial0,115200; removed duplicate" in changes[-1]

    (boot / "cmdline.txt").write_bytes(b"console=tty1 root=/dev/mmcblk0p2 rootwait\r\n")  # edited on Windows
    provision(boot, hostname="cam-1", user="pi", password="x")
    assert (boot / "cmdline.txt").read_bytes() == (" ".join(["console=serial0,115200", "console=tty1", "root=/dev/mmcblk0p2",
                                                             "rootwait", *FIRSTRUN_TOKENS]) + "\r\n").encode()


def test_uart_console_off_leaves_uart_alone(boot: Path):
    provision(boot, hostname="cam-1", user="pi", password="x", uart_console=False, enable_ssh=False)
    assert "enable_uart" not in (boot / "config.txt").read_text()
    assert "console=serial0" not in (boot / "cmdline.txt").read_text()
    assert not (boot / "ssh").exists()


def test_coral_usb(boot: Path):
    changes = provision(boot, hostname="cam-1", user="edge", password="x", coral="usb")
    rules = (boot / "99-edgetpu-accelerator.rules").read_text()
    assert 'ATTRS{idVendor}=="1a6e", ATTRS{idProduct}=="089a"' in rules and 'ATTRS{idVendor}=="18d1", ATTRS{idProduct}=="9302"' in rules
    assert rules.count('GROUP="plugdev"') == 2
    note = next(c for c in changes if c.startswith("99-edgetpu"))
    assert "plugdev" in note and "1a6e:089a" in note and "18d1:9302" in note
    assert "CORAL_USB=1" in (boot / "firstrun.sh").read_text()
    assert all("pciex1" not in line for line in (boot / "config.txt").read_text().splitlines())


@pytest.mark.parametrize("kwargs, message", [
    (dict(hostname="-cam"), "bad hostname"),
    (dict(hostname="cam_1"), "bad hostname"),
    (dict(hostname="cam.local"), "bad hostname"),
    (dict(hostname="x" * 64), "bad hostname"),
    (dict(user=""), "bad user name"),
    (dict(user="pi:0"), "bad user name"),
    (dict(user="pi\nroot"), "bad user name"),
    (dict(user="root"), "bad user name"),
    (dict(password=""), "bad password"),
    (dict(password="a:b"), "bad password"),
    (dict(password="a\nb"), "bad password"),
    (dict(ssh_pubkey="ssh-dss AAAAB3NzaC1kc3M= me"), "must start with"),
    (dict(ssh_pubkey="-----BEGIN OPENSSH PRIVATE KEY-----\nb3Blbn\n-----END OPENSSH PRIVATE KEY-----\n"), "PRIVATE"),
    (dict(ssh_pubkey=KEY + KEY), "one printable line"),
    (dict(ssh_pubkey="ssh-ed25519 not*base64 me"), "not base64"),
    (dict(ssh_pubkey="ssh-rsa " + KEY.split()[1]), "does not match its type"),
    (dict(coral="tpu"), "unknown coral='tpu'"),
])
def test_bad_arguments_change_nothing(boot: Path, kwargs: dict, message: str):
    before = snapshot(boot)
    args = dict(hostname="cam-1", user="pi", password="x", ssh_pubkey=KEY) | kwargs
    with pytest.raises(ProvisionError, match=message) as err:
        provision(boot, **args)
    assert "\n" not in str(err.value)
    assert snapshot(boot) == before


@pytest.mark.parametrize("missing", ["config.txt", "cmdline.txt", "folder"])
def test_not_a_boot_partition(boot: Path, missing: str):
    target = boot / "nowhere" if missing == "folder" else boot
    if missing != "folder":
        (boot / missing).unlink()
    with pytest.raises(ProvisionError, match="does not look like a Raspberry Pi boot partition") as err:
        provision(target, hostname="cam-1", user="pi", password="x")
    assert "\n" not in str(err.value)


def test_refuses_what_it_would_break(boot: Path):
    # a never-booted image without userconf.txt stops at first boot to ask for a user
    with pytest.raises(ProvisionError, match="pass a password"):
        provision(boot, hostname="cam-1", user="pi")
    (boot / "firstrun.sh").write_text("#!/bin/bash\n# from Raspberry Pi Imager\n")
    with pytest.raises(ProvisionError, match="not written by edgemeta"):
        provision(boot, hostname="cam-1", user="pi", password="x")
    (boot / "firstrun.sh").unlink()
    (boot / "cmdline.txt").write_text("root=/dev/sda2 systemd.run=/boot/firmware/other.sh\n")
    with pytest.raises(ProvisionError, match="another first-boot program"):
        provision(boot, hostname="cam-1", user="pi", password="x")
    (boot / "cmdline.txt").write_text("root=/dev/sda2\nrootwait\n")
    with pytest.raises(ProvisionError, match="2 lines"):
        provision(boot, hostname="cam-1", user="pi", password="x")
    # an image that has booted (no firstboot token) keeps its user without a password
    (boot / "cmdline.txt").write_text("console=tty1 root=/dev/sda2 rootwait\n")
    assert not any(c.startswith("userconf") for c in provision(boot, hostname="cam-1", user="pi"))
    assert not (boot / "userconf.txt").exists()
    (boot / "userconf.txt").write_text("alice:$6$salt$hash\n")
    with pytest.raises(ProvisionError, match="creates user 'alice', not 'pi'"):
        provision(boot, hostname="cam-1", user="pi")


@pytest.mark.parametrize("fail_in", ["fsync", "replace"])
def test_failed_write_leaves_old_file_and_no_temp(boot: Path, monkeypatch, fail_in: str):
    before = (boot / "cmdline.txt").read_bytes()
    real = getattr(os, fail_in)

    def failing(*args):
        if fail_in == "replace" and not str(args[1]).endswith("cmdline.txt"):
            return real(*args)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, fail_in, failing)
    with pytest.raises(OSError, match="No space left"):
        provision(boot, hostname="cam-1", user="pi", password="x")
    assert (boot / "cmdline.txt").read_bytes() == before
    assert not [p for p in boot.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("helper", ["ok", "fails", "absent"])
def test_firstrun_script_runs(boot: Path, tmp_path: Path, helper: str):
    """Run the generated firstrun.sh with bash against a fake root. PATH holds only the harmless tools
    it needs plus logging stubs for the ones that change the system, so nothing else can run."""
    provision(boot, hostname="cam-1", user="pi", password="s3cret", ssh_pubkey=KEY, coral="usb")
    hashed = (boot / "userconf.txt").read_text().strip().split(":", 1)[1]
    root = boot.parents[1]
    (root / "etc").mkdir()
    (root / "etc" / "hostname").write_text("raspberrypi\n")
    (root / "etc" / "hosts").write_text("127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n\n127.0.1.1\traspberrypi\n")
    (root / "home" / "pi").mkdir(parents=True)
    log = tmp_path / "calls.log"
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in ("sync", "mv", "rm", "grep", "sed", "mkdir", "chmod", "touch", "cut", "cp"):
        (bindir / tool).symlink_to(shutil.which(tool))

    def stub(path: Path, body: str = "") -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f'#!/bin/bash\necho "${{0##*/}} $*" >> {log}\n{body}')
        path.chmod(0o755)

    for tool in ("chown", "systemctl", "usermod", "useradd", "chpasswd", "id"):
        stub(bindir / tool)
    stub(bindir / "getent", 'echo "pi:x:1000:1000:,,,:/home/pi:/bin/bash"\n')
    if helper != "absent":  # raspberrypi-sys-mods' helper that renames the image's user 1000
        stub(root / "usr" / "lib" / "userconf-pi" / "userconf", "exit 1\n" if helper == "fails" else "")
    env = {"PATH": str(bindir), "FIRSTRUN_ROOT": str(root), "LANG": "C"}
    proc = subprocess.run([shutil.which("bash"), str(boot / "firstrun.sh")], env=env, capture_output=True, text=True, timeout=20)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert "firstrun: done" in proc.stdout

    # it took itself out of cmdline.txt (and nothing else), and deleted itself and (once used) the password hash
    assert (boot / "cmdline.txt").read_text() == "console=serial0,115200 " + BOOKWORM_CMDLINE
    assert not (boot / "firstrun.sh").exists()
    assert (boot / "userconf.txt").exists() == (helper == "fails")
    assert (root / "etc" / "hostname").read_text() == "cam-1\n"
    hosts = (root / "etc" / "hosts").read_text()
    assert hosts.endswith("\n127.0.1.1\tcam-1\n") and "raspberrypi" not in hosts
    ssh_dir = root / "home" / "pi" / ".ssh"
    assert (ssh_dir / "authorized_keys").read_text() == KEY
    assert stat.S_IMODE(ssh_dir.stat().st_mode) == 0o700 and stat.S_IMODE((ssh_dir / "authorized_keys").stat().st_mode) == 0o600
    assert (root / "etc" / "udev" / "rules.d" / "99-edgetpu-accelerator.rules").read_text() == prov.USB_RULES
    calls = log.read_text().splitlines()
    if helper == "absent":
        assert "id pi" in calls and "chpasswd -e" in calls
    else:
        assert f"userconf pi {hashed}" in calls
    assert f"chown -R pi: {ssh_dir}" in calls and "systemctl enable ssh" in calls and "usermod -aG plugdev pi" in calls
