"""`edgemeta doctor`: is this board ready to run edgemeta? Every check passes, warns or fails with the fix.

Standard library only, so it runs with the board's bare python3 before anything is installed:
`edgemeta doctor --host pi@board` sends this file over ssh and runs it there
(edgemeta.deploy.ssh.doctor_on_host).

    python3 doctor.py [--json] [--profile-json '{...board profile...}'] [--root DIR]

DIR is the board's edgemeta root (edgemeta.runtime.paths, which this file cannot import); the
disk check looks there when it exists, else in the home folder.
"""

from __future__ import annotations

import ctypes.util
import glob
import grp
import importlib
import json
import os
import platform
import shutil
import sys

CORAL_USB = {("1a6e", "089a"): "Coral USB Accelerator (before first use)", ("18d1", "9302"): "Coral USB Accelerator (ready)"}


def _ver(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(".")[:2] if x.isdigit())


def run_checks(profile: dict | None = None, root: str | None = None) -> list[dict]:
    profile = profile or {}
    runtime = profile.get("runtime", {})
    delegate = profile.get("delegate", {}).get("name", "")
    checks = []

    def add(name: str, status: str, detail: str, fix: str = "") -> None:
        checks.append({"check": name, "status": status, "detail": detail, "fix": fix})

    py = platform.python_version()
    add("python", "pass" if sys.version_info >= (3, 10) else "fail", py,
        "" if sys.version_info >= (3, 10) else "edgemeta needs Python 3.10+: use Raspberry Pi OS bookworm (3.11) or install a newer Python")
    want = profile.get("python")
    if want and _ver(py) != _ver(want):
        add("python matches profile", "warn", f"{py}, the profile says {want}", "check that the board runs the OS the profile names")
    arch = platform.machine()
    if profile.get("arch") and arch != profile["arch"]:
        add("architecture", "fail", f"{arch}, the profile expects {profile['arch']}",
            "use the profile of this board (`edgemeta boards`), e.g. rpi3b-32bit for a 32-bit OS")
    else:
        add("architecture", "pass", arch)
    libc, libc_ver = platform.libc_ver()
    need = "2.34" if runtime.get("package") == "tflite-runtime" else "2.27"
    ok = libc == "glibc" and _ver(libc_ver) >= _ver(need)
    add("glibc", "pass" if ok else "fail", f"{libc} {libc_ver}", "" if ok else f"the runtime's wheels need glibc >= {need}: upgrade the OS")

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
        add("interpreter", "fail", f"not importable ({err})", f"pip install '{pkg}' (edgemeta deploy does this in the release's venv)")
    try:
        import numpy

        nver = numpy.__version__
        bad = found == "tflite_runtime" and _ver(nver) >= (2, 0)
        add("numpy", "fail" if bad else "pass", nver, "tflite-runtime 2.14 needs numpy < 2: pip install 'numpy<2'" if bad else "")
    except ImportError:
        add("numpy", "fail", "not installed", "pip install numpy (32-bit Raspberry Pi OS: apt-get install python3-numpy)")

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
    where = str(root) if root and os.path.exists(root) else os.path.expanduser("~")
    free = shutil.disk_usage(where).free // 2**20
    add("disk", "pass" if free >= 300 else "fail", f"{free} MB free in {where}",
        "" if free >= 300 else "a release needs ~250 MB (venv + runtime): free some space")
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


def format_checks(checks: list[dict]) -> str:
    return "\n".join(f"{c['status'].upper():5} {c['check']:22} {c['detail']}" + (f"\n      fix: {c['fix']}" if c["fix"] else "")
                     for c in checks)


def main(argv: list[str]) -> int:
    profile = json.loads(argv[argv.index("--profile-json") + 1]) if "--profile-json" in argv else None
    root = argv[argv.index("--root") + 1] if "--root" in argv else None
    checks = run_checks(profile, root)
    print(json.dumps(checks) if "--json" in argv else format_checks(checks))
    return 1 if any(c["status"] == "fail" for c in checks) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
