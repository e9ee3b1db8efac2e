import json
import os
import subprocess
import sys


def cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "edgemeta", *args], capture_output=True, text=True, env=env)


def test_doctor_here():
    p = cli("doctor", "--board", "generic-x86_64", "--json")
    checks = {c["check"]: c for c in json.loads(p.stdout)}
    assert {"python", "architecture", "glibc", "interpreter", "numpy", "libedgetpu", "coral usb", "disk", "memory"} <= set(checks)
    assert checks["architecture"]["status"] == "pass" and checks["disk"]["status"] == "pass"
    # the wrong profile for this machine fails, and says what to do
    p = cli("doctor", "--board", "rpi-coral-usb")
    assert p.returncode == 1 and "FAIL  architecture" in p.stdout and "fix: use the profile of this board" in p.stdout
    assert "apt-get install libedgetpu1-std" in p.stdout


def test_boards_show_names_the_system_packages_a_profile_needs():
    p = cli("boards", "show", "rpi3b-32bit")
    assert p.returncode == 0 and "system packages  python3-numpy, python3-pil (sudo apt install python3-numpy python3-pil" in p.stdout
    p = cli("boards", "show", "rpi5")
    assert p.returncode == 0 and "system packages  none" in p.stdout and "python3-venv" in p.stdout


def test_provision_cli_is_idempotent(tmp_path):
    boot = tmp_path / "bootfs"
    boot.mkdir()
    (boot / "config.txt").write_text("# For more options and information see\n[all]\ndtparam=audio=on\n")
    (boot / "cmdline.txt").write_text("console=tty1 root=PARTUUID=1234-02 rootfstype=ext4 fsck.repair=yes rootwait\n")
    key = tmp_path / "id.pub"
    key.write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJ5k7hV2aG8m8JZ3CFdGUiz8Pj2hX0E7q0uYbFhS2yFK test@host\n")
    env = {**os.environ, "PW": "correct horse"}
    args = ["provision", str(boot), "--hostname", "kitchen", "--user", "pi", "--password-env", "PW",
            "--ssh-key", str(key), "--coral", "usb"]
    first = cli(*args, env=env)
    assert first.returncode == 0, first.stderr
    assert "enable_uart=1" in (boot / "config.txt").read_text() and "console=serial0,115200" in (boot / "cmdline.txt").read_text()
    assert (boot / "ssh").exists() and (boot / "userconf.txt").read_text().startswith("pi:$6$")
    again = cli(*args, env=env)
    assert again.returncode == 0 and "nothing to change" in again.stdout
    bad = cli("provision", str(tmp_path), "--hostname", "x", "--user", "pi", "--password-env", "PW", env=env)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and bad.stderr.count("\n") == 1


def test_console_needs_its_password_variable():
    p = cli("console", "--device", "/dev/null", "--user", "pi", "--password-env", "EDGEMETA_NO_SUCH_VAR", "true")
    assert p.returncode == 2 and "EDGEMETA_NO_SUCH_VAR is not set" in p.stderr


def test_one_board_root(tmp_path):
    """$EDGEMETA_ROOT, else ~/.edgemeta: the Python rule, its sh form (commands over ssh) and the board_ops zip
    application's (the same module, carried in it) agree."""
    from edgemeta.deploy.board_ops import zipapp_file
    from edgemeta.runtime.paths import ROOT_SH

    (tmp_path / "home").mkdir()  # (status looks at the free space there)
    for value in (str(tmp_path / "r"), "", None):
        env = {k: v for k, v in os.environ.items() if k != "EDGEMETA_ROOT"} | {"HOME": str(tmp_path / "home")}
        if value is not None:
            env["EDGEMETA_ROOT"] = value
        code = "from edgemeta.runtime.paths import board_root; print(board_root())"
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
        assert p.returncode == 0, p.stderr
        board = subprocess.run([sys.executable, "-I", "-S", str(zipapp_file()), "status"], capture_output=True, text=True, env=env)
        assert board.returncode == 0, board.stdout + board.stderr
        here, copy = p.stdout.strip(), json.loads(board.stdout)["root"]
        sh = subprocess.run(["sh", "-c", f'{ROOT_SH}; printf %s "$R"'], capture_output=True, text=True, env=env).stdout
        assert here == copy == sh == (value or str(tmp_path / "home" / ".edgemeta"))
