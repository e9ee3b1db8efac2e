"""`edgemeta doctor`: will a deploy to this board succeed, and if not, the one command that fixes it?
Every check passes, warns, fails with its fix, or is info.

Standard library only, so it runs with the board's bare python3 before anything is installed:
`edgemeta doctor --host pi@board` sends this file over ssh and runs it there
(edgemeta.deploy.fleet_ops.doctor_on_host), and `edgemeta deploy` runs the same checks as its preflight
before a board makes a venv.

    python3 doctor.py [--json] [--profile-json '{...board profile...}'] [--root DIR] [--wheelhouse]

DIR is the board's edgemeta root (edgemeta.runtime.paths, which this file cannot import): the
space and write-access checks look there, or at the folder it will be made in. --wheelhouse: the
deploy brings every wheel, so no package index is needed (but the profile's Python is).

What deploy installs itself (the interpreter package, numpy, in the release's venv) is no failure
on a board that has not had a deploy yet; it fails only when this runs inside a release's venv.
"""

from __future__ import annotations

import configparser
import ctypes.util
import glob
import grp
import importlib
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import urllib.error
import urllib.request

CORAL_USB = {("1a6e", "089a"): "Coral USB Accelerator (before first use)", ("18d1", "9302"): "Coral USB Accelerator (ready)"}


def _ver(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(".")[:2] if x.isdigit())


def index_url() -> str:
    """The package index pip on this board would use: $PIP_INDEX_URL, else pip.conf's index-url, else PyPI."""
    if os.environ.get("PIP_INDEX_URL"):
        return os.environ["PIP_INDEX_URL"]
    conf = configparser.ConfigParser()
    conf.read([f for f in ("/etc/pip.conf", "/etc/xdg/pip/pip.conf", os.path.expanduser("~/.pip/pip.conf"),
                           os.path.expanduser("~/.config/pip/pip.conf"), os.environ.get("PIP_CONFIG_FILE", "")) if f])
    for section in ("install", "global"):
        if conf.get(section, "index-url", fallback=""):
            return conf.get(section, "index-url")
    return "https://pypi.org/simple/"


def unreachable(url: str, timeout: float = 5.0) -> str:
    """Why `url` gives no HTTP answer from here (proxies as pip takes them from the environment); "" when it does."""
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return ""  # an answer, if not a 200: the index is there
    except (OSError, ValueError) as e:
        return str(getattr(e, "reason", None) or e)[:160]
    return ""


def missing_debs(packages: list[str]) -> list[str] | None:
    """The Debian packages of `packages` not installed here (None: no dpkg-query to ask)."""
    if not shutil.which("dpkg-query"):
        return None
    missing = []
    for pkg in packages:
        p = subprocess.run(["dpkg-query", "-W", "-f=${db:Status-Abbrev}", pkg], capture_output=True, text=True)
        if p.returncode != 0 or not p.stdout.startswith("ii"):
            missing.append(pkg)
    return missing


def venv_with_pip() -> str:
    """Why `python3 -m venv` cannot make a venv with pip here ("" when it can): Debian splits ensurepip
    (python3-venv) and the pip wheel it installs (python3-pip-whl, which python3-venv pulls in) out of Python."""
    if importlib.util.find_spec("venv") is None or importlib.util.find_spec("ensurepip") is None:
        return "no ensurepip module"
    spec = importlib.util.find_spec("ensurepip")
    bundled = glob.glob(os.path.join(os.path.dirname(spec.origin or ""), "_bundled", "pip-*.whl"))
    if not bundled and not glob.glob("/usr/share/python-wheels/pip-*.whl"):
        return "ensurepip has no pip wheel"
    return ""


def wheel_glibc(runtime: dict) -> str:
    """The glibc the runtime package's wheel needs: the first of the profile's wheel platforms
    (manylinux_2_27_aarch64 -> 2.27); the others are for the rest of the requirements."""
    tags = runtime.get("wheel_platforms") or []
    m = re.match(r"manylinux_(\d+)_(\d+)_", tags[0]) if tags else None
    if m:
        return f"{m.group(1)}.{m.group(2)}"
    return "2.34" if runtime.get("package") == "tflite-runtime" else "2.27"


def run_checks(profile: dict | None = None, root: str | None = None, wheelhouse: bool = False) -> list[dict]:
    profile = profile or {}
    runtime = profile.get("runtime", {})
    delegate = profile.get("delegate", {}).get("name", "")
    in_venv = sys.prefix != sys.base_prefix  # a release's venv (after a deploy), not the board's python3
    checks = []

    def add(name: str, status: str, detail: str, fix: str = "") -> None:
        checks.append({"check": name, "status": status, "detail": detail, "fix": fix})

    py = platform.python_version()
    add("python", "pass" if sys.version_info >= (3, 10) else "fail", py,
        "" if sys.version_info >= (3, 10) else "edgemeta needs Python 3.10+: use Raspberry Pi OS bookworm (3.11) or install a newer Python")
    want = profile.get("python")
    if want and _ver(py) != _ver(want):
        if wheelhouse:  # its wheels are built for the profile's Python alone
            add("python matches profile", "fail", f"{py}, the profile and its wheelhouse are for {want}",
                "deploy with the profile of this board's OS (`edgemeta boards`), or without --wheelhouse if it reaches a package index")
        else:
            add("python matches profile", "warn", f"{py}, the profile says {want}", "check that the board runs the OS the profile names")
    if not in_venv:
        why = venv_with_pip()
        add("venv", "fail" if why else "pass", f"python3 -m venv: {why}" if why else "python3 -m venv with pip",
            "sudo apt install python3-venv" if why else "")
    if wheelhouse:
        add("package index", "info", "not needed: the bundle carries every wheel (--wheelhouse)")
    elif not in_venv:
        url = index_url()
        why = unreachable(url)
        add("package index", "fail" if why else "pass", f"{url} {'unreachable: ' + why if why else 'reachable'}",
            "deploy with --wheelhouse (the bundle then carries every wheel for this board)" if why else "")
    debs = runtime.get("system_packages") or []
    if debs:
        missing = missing_debs(debs)
        if missing is None:
            add("system packages", "warn", f"cannot check {', '.join(debs)} (no dpkg-query)", "install them with the OS's package manager")
        else:
            add("system packages", "fail" if missing else "pass",
                f"missing: {', '.join(missing)}" if missing else f"{', '.join(debs)} installed",
                f"sudo apt install {' '.join(missing)}" if missing else "")
    arch = platform.machine()
    if profile.get("arch") and arch != profile["arch"]:
        add("architecture", "fail", f"{arch}, the profile expects {profile['arch']}",
            "use the profile of this board (`edgemeta boards`), e.g. rpi3b-32bit for a 32-bit OS")
    else:
        add("architecture", "pass", arch)
    libc, libc_ver = platform.libc_ver()
    need = wheel_glibc(runtime)
    ok = libc == "glibc" and _ver(libc_ver) >= _ver(need)
    if ok and profile.get("glibc") and _ver(libc_ver) < _ver(profile["glibc"]):
        add("glibc", "warn", f"{libc} {libc_ver}, older than the profile's {profile['glibc']} (the runtime needs {need})",
            "check that the board runs the OS the profile names")
    else:
        add("glibc", "pass" if ok else "fail", f"{libc} {libc_ver or '?'}" + ("" if ok else f", the runtime's wheels need glibc >= {need}"),
            "" if ok else "upgrade the board's OS (Raspberry Pi OS bookworm has 2.36)")

    module = runtime.get("module")
    found = None
    for name in ([module] if module else ["ai_edge_litert", "tflite_runtime"]):
        try:
            importlib.import_module(f"{name}.interpreter")
            found = name
            break
        except Exception as e:  # ImportError, or a numpy ABI error raised while importing
            err = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
    if found:
        from importlib import metadata

        dist = {"ai_edge_litert": "ai-edge-litert", "tflite_runtime": "tflite-runtime"}[found]
        try:
            version = metadata.version(dist)
        except metadata.PackageNotFoundError:
            version = "?"
        add("interpreter", "pass", f"{found} {version}")
    else:
        pkg = f"{runtime.get('package', 'ai-edge-litert')}=={runtime['version']}" if runtime.get("version") else "ai-edge-litert"
        if in_venv:
            add("interpreter", "fail", f"not importable ({err})", f"deploy again (the release's venv lacks {pkg})")
        else:
            add("interpreter", "info", f"not in the board's python3: deploy installs {pkg} in the release's venv")
    try:
        import numpy

        nver = numpy.__version__
        bad = found == "tflite_runtime" and _ver(nver) >= (2, 0)
        add("numpy", "fail" if bad else "pass", nver, "tflite-runtime 2.14 needs numpy < 2: pip install 'numpy<2'" if bad else "")
    except ImportError:
        if in_venv:
            add("numpy", "fail", "not installed", "deploy again (the release's venv lacks numpy)")
        else:
            add("numpy", "info", "not in the board's python3: deploy installs it in the release's venv"
                + (" (from the OS's python3-numpy)" if "python3-numpy" in debs else ""))

    lib = ctypes.util.find_library("edgetpu") or next(iter(glob.glob("/usr/lib/*/libedgetpu.so.1*")), None)
    need_tpu = delegate == "edgetpu"
    add("libedgetpu", "pass" if lib else ("fail" if need_tpu else "info"), lib or "not installed",
        "" if lib or not need_tpu else "install the Edge TPU runtime: apt-get install libedgetpu1-std (Coral's apt repository)")
    usb = []
    for dev in glob.glob("/sys/bus/usb/devices/*"):
        try:
            ids = (open(f"{dev}/idVendor").read().strip(), open(f"{dev}/idProduct").read().strip())
        except OSError:
            continue
        if ids in CORAL_USB:
            usb.append(f"{ids[0]}:{ids[1]} {CORAL_USB[ids]}")
    if need_tpu and profile.get("delegate", {}).get("device") == "usb":
        add("coral usb", "pass" if usb else "fail", ", ".join(usb) or "no Coral USB Accelerator found",
            "" if usb else "plug the accelerator into a USB 3 port (it shows as 1a6e:089a, then 18d1:9302 after first use)")
    else:
        add("coral usb", "info", ", ".join(usb) or "none")
    try:
        groups = sorted({grp.getgrgid(g).gr_name for g in os.getgroups()})
    except KeyError:
        groups = []
    is_root = os.geteuid() == 0
    for g, why in (("plugdev", "the Coral USB Accelerator"), ("dialout", "serial ports")):
        needed = (g == "plugdev" and need_tpu) or (g == "dialout" and profile.get("serial"))
        if g in groups or is_root:
            add(f"group {g}", "pass", "member" if g in groups else "root")
        else:
            add(f"group {g}", "warn" if needed else "info", "not a member",
                f"sudo usermod -aG {g} $USER, then log in again ({why})")
    where = root or os.path.expanduser("~/.edgemeta")
    exists = where
    while not os.path.exists(exists) and os.path.dirname(exists) != exists:
        exists = os.path.dirname(exists)  # the folder ROOT will be made in
    free = shutil.disk_usage(exists).free // 2**20
    add("disk", "pass" if free >= 300 else "fail", f"{free} MB free in {exists}",
        "" if free >= 300 else "a release with a new venv needs ~250 MB: free some space")
    user = _user()
    blocked = [p for p in ([exists] if exists != where else [where, *glob.glob(os.path.join(where, "*"))])
               if not os.path.islink(p) and not os.access(p, os.W_OK)]
    add("write access", "fail" if blocked else "pass",
        f"{blocked[0]} is not writable by {user}" if blocked else f"{user} can write {where}",
        (f"sudo chown -R {user}: {where}" if exists == where else f"sudo mkdir -p {where} && sudo chown {user}: {where}")
        if blocked else "")
    try:
        mem = {k: int(v.split()[0]) for k, v in (ln.split(":", 1) for ln in open("/proc/meminfo"))}
        avail = mem.get("MemAvailable", mem.get("MemFree", 0)) // 1024
        add("memory", "pass" if avail >= 100 else "warn", f"{avail} MB available of {mem['MemTotal'] // 1024} MB",
            "" if avail >= 100 else "the agent needs ~100 MB: stop other services")
    except (OSError, KeyError, ValueError):
        add("memory", "info", "unknown (no /proc/meminfo)")
    serial_dev = profile.get("serial", {}).get("device")
    if serial_dev:
        exists = os.path.exists(serial_dev)
        add("serial port", "pass" if exists else "warn", f"{serial_dev} {'present' if exists else 'missing'}",
            "" if exists else "enable the UART (enable_uart=1 in config.txt: `edgemeta provision`) and reboot")
    return checks


def _user() -> str:
    import pwd

    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return str(os.getuid())


def format_checks(checks: list[dict]) -> str:
    return "\n".join(f"{c['status'].upper():5} {c['check']:22} {c['detail']}" + (f"\n      fix: {c['fix']}" if c["fix"] else "")
                     for c in checks)


def main(argv: list[str]) -> int:
    profile = json.loads(argv[argv.index("--profile-json") + 1]) if "--profile-json" in argv else None
    root = argv[argv.index("--root") + 1] if "--root" in argv else None
    checks = run_checks(profile, root, wheelhouse="--wheelhouse" in argv)
    print(json.dumps(checks) if "--json" in argv else format_checks(checks))
    return 1 if any(c["status"] == "fail" for c in checks) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
