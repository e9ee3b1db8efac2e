"""Deploying to emulated Raspberry Pis: Raspberry Pi OS 64-bit (Debian bookworm arm64) and 32-bit
(armhf) userlands under qemu, each with its own sshd, and the rpi5 / rpi3b-32bit profiles' bundles
with offline wheelhouses (ai-edge-litert on arm64; tflite-runtime 2.14 with the OS's numpy on
armhf). Install, health check, doctor, enroll and classify, all through the CLI."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edgemeta.deploy.bundle import build_bundle
from tests.support.emulated_pi import EmulatedPi, build_rootfs, register_binfmt

SAMPLE = Path(__file__).resolve().parents[1] / "samples" / "omniglot"


CASES = {"arm64": ("rpi5", "aarch64", "ai_edge_litert 2.3.0"), "armhf": ("rpi3b-32bit", "armv7l", "tflite_runtime 2.14.0")}


@pytest.fixture(scope="module")
def rootfs():
    """Build both userlands at once on a machine that has none cached (each takes minutes)."""
    from concurrent.futures import ThreadPoolExecutor

    for arch in CASES:
        register_binfmt(arch)
    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(build_rootfs, CASES))


@pytest.fixture(scope="module", params=list(CASES))
def pi(lab, rootfs, request):
    board = EmulatedPi(lab, request.param)
    yield board
    board.stop()


def test_deploy_enroll_classify_on_an_emulated_pi(pi, lab, exported, tmp_path):
    profile, machine, interpreter = CASES[pi.arch]
    ssh = ["--ssh-config", str(lab.ssh_config)]
    arch = subprocess.run(["ssh", "-F", str(lab.ssh_config), pi.alias, "uname -m; python3 --version"], capture_output=True, text=True)
    assert arch.stdout.split()[:3] == [machine, "Python", "3.11.2"], arch.stderr
    bundle = build_bundle(profile, exported, tmp_path / profile, wheelhouse=True)
    assert all(machine in w.name or "none-any" in w.name for w in (bundle / "wheelhouse").iterdir())
    # a fresh board that deploy can handle passes doctor (the armhf one with its system packages, numpy and Pillow)
    doctor = subprocess.run([sys.executable, "-m", "edgemeta", "doctor", "--board", profile, "--host", pi.alias, *ssh, "--wheelhouse",
                             "--json"], capture_output=True, text=True, timeout=300)
    checks = {c["check"]: c for c in json.loads(doctor.stdout)}
    assert doctor.returncode == 0 and checks["venv"]["status"] == "pass", doctor.stdout + doctor.stderr
    if pi.arch == "armhf":
        assert checks["system packages"]["status"] == "pass" and "python3-numpy" in checks["system packages"]["detail"]
    p = subprocess.run([sys.executable, "-m", "edgemeta", "deploy", "--bundle", str(bundle), "--host", pi.alias, *ssh, "--trust-key"],
                       capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"{pi.alias}: trusted signing key " in p.stderr, p.stderr  # a fresh board trusts no key until told
    assert "health check through current passed" in p.stderr
    doctor = subprocess.run([sys.executable, "-m", "edgemeta", "doctor", "--board", profile, "--host", pi.alias, *ssh, "--json"],
                            capture_output=True, text=True, timeout=300)
    checks = {c["check"]: c for c in json.loads(doctor.stdout)}
    assert checks["architecture"]["status"] == "pass" and checks["interpreter"]["detail"] == interpreter, doctor.stdout
    assert checks["numpy"]["status"] == "pass"
    remote = [sys.executable, "-m", "edgemeta", "remote", "--via", f"ssh:{pi.alias}", *ssh, "--timeout", "300"]
    for char in ("Keble_character01", "Tengwar_character05"):
        files = [str(f) for f in sorted((SAMPLE / char).glob("*.png"))[:2]]
        r = subprocess.run([*remote, "enroll", "--label", char, *files], capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr
    queries = [str(sorted((SAMPLE / c).glob("*.png"))[-1]) for c in ("Keble_character01", "Tengwar_character05")]
    r = subprocess.run([*remote, "classify", "--json", *queries], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    labels = [x["top"][0]["label"] for x in json.loads(r.stdout)]
    assert labels == ["Keble_character01", "Tengwar_character05"]
    # the store lives on the emulated board, in the deployed layout
    assert (pi.edgemeta_root / "store" / "store.npz").is_file() and (pi.edgemeta_root / "current").is_symlink()
