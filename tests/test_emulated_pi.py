"""Deploying to an emulated Raspberry Pi: Raspberry Pi OS 64-bit userland (Debian bookworm arm64,
Python 3.11) under qemu, with its own arm64 sshd, and the rpi5 profile's bundle with an offline
aarch64 wheelhouse. Install, health check, doctor, enroll and classify, all through the CLI."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from emulated_pi import EmulatedPi

from edgemeta.deploy.bundle import build_bundle

SAMPLE = Path(__file__).resolve().parents[1] / "samples" / "omniglot"


@pytest.fixture(scope="module")
def pi(lab):
    board = EmulatedPi(lab, "arm64")
    yield board
    board.stop()


def test_deploy_enroll_classify_on_an_emulated_pi5(pi, lab, exported, tmp_path):
    ssh = ["--ssh-config", str(lab.ssh_config)]
    arch = subprocess.run(["ssh", "-F", str(lab.ssh_config), pi.alias, "uname -m; python3 --version"], capture_output=True, text=True)
    assert arch.stdout.split()[:3] == ["aarch64", "Python", "3.11.2"], arch.stderr
    bundle = build_bundle("rpi5", exported, tmp_path / "rpi5", wheelhouse=True)
    assert all("aarch64" in w.name or "none-any" in w.name for w in (bundle / "wheelhouse").iterdir())
    p = subprocess.run([sys.executable, "-m", "edgemeta", "deploy", "--bundle", str(bundle), "--host", pi.alias, *ssh],
                       capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "health check through current passed" in p.stderr
    doctor = subprocess.run([sys.executable, "-m", "edgemeta", "doctor", "--board", "rpi5", "--host", pi.alias, *ssh, "--json"],
                            capture_output=True, text=True, timeout=300)
    checks = {c["check"]: c for c in json.loads(doctor.stdout)}
    assert checks["architecture"]["status"] == "pass" and checks["interpreter"]["detail"] == "ai_edge_litert 2.3.0"
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
