"""Shared fixtures: the real Omniglot data from ../shared/data, small real-image folders made from it."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_OMNIGLOT = REPO.parent / "shared" / "data" / "omniglot"
SAMPLE = REPO / "samples" / "omniglot"


# What a test needs beyond the Python packages, as markers, so the fast core runs alone:
#   pytest -m "not sshd and not qemu and not tf and not slow"
# A test is marked by the fixtures it uses (the lab is a real sshd, `exported` trains with TensorFlow...);
# test files that are TensorFlow, sshd or qemu throughout say so with their own `pytestmark`.
MARKS_OF_FIXTURES = {"lab": "sshd", "exported": "tf", "snail_exported": "tf", "trained": "tf",
                     "board_venv": "slow", "tflite_runtime_venv": "slow",  # a fresh virtual environment each
                     "slow_link": "slow"}  # seconds of paced bytes at 9600-38400 baud


def pytest_collection_modifyitems(items):
    for item in items:
        for fixture, mark in MARKS_OF_FIXTURES.items():
            if fixture in getattr(item, "fixturenames", ()):
                item.add_marker(mark)


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Every test session decodes into its own cache folder (and never touches ~/.cache), and signs
    bundles with its own key (never the user's in ~/.config/edgemeta)."""
    os.environ["EDGEMETA_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    os.environ["EDGEMETA_CONFIG"] = str(tmp_path_factory.mktemp("config"))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture(scope="session")
def omniglot_dir() -> Path:
    if not (SHARED_OMNIGLOT / "images_background.zip").is_file():
        pytest.fail(f"Omniglot is expected in {SHARED_OMNIGLOT} (../shared/data/omniglot from the repo)")
    return SHARED_OMNIGLOT


@pytest.fixture(scope="session")
def mini_omniglot(tmp_path_factory, omniglot_dir) -> Path:
    """A folder in the official zip layout holding a few real alphabets (fast to decode):
    background: two lake-validation alphabets and two training ones; evaluation: two."""
    keep = {"images_background": ("Alphabet_of_the_Magi", "Futurama", "Greek", "Latin"),
            "images_evaluation": ("Keble", "Tengwar")}
    out = tmp_path_factory.mktemp("mini_omniglot")
    for part, alphabets in keep.items():
        with zipfile.ZipFile(omniglot_dir / f"{part}.zip") as src, zipfile.ZipFile(out / f"{part}.zip", "w") as dst:
            for name in src.namelist():
                bits = name.split("/")
                if len(bits) > 1 and bits[1] in alphabets:
                    dst.writestr(name, src.read(name))
    return out


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    return SAMPLE


@pytest.fixture(scope="session")
def exported(tmp_path_factory, sample_dir):
    from edgemeta.host.export import export_model
    from edgemeta.host.training import train
    from tests.support.builders import tiny_config

    out = tmp_path_factory.mktemp("exported")
    train(tiny_config(sample_dir, episodes=60), out, progress=False)
    export_model(out, folder=str(sample_dir), episodes=100, log=lambda m: None)
    return out


@pytest.fixture(scope="session")
def snail_exported(tmp_path_factory, sample_dir):
    """A few episodes of SNAIL over the sample characters, exported (sequence graphs float32 and int8)."""
    from edgemeta.host.export import export_model
    from edgemeta.host.training import train
    from tests.support.builders import SNAIL_TINY, tiny_config

    cfg = tiny_config(sample_dir, episodes=16, meta_batch=4, shot=2, query=2)
    cfg = type(cfg)(**{**cfg.__dict__, "method": type(cfg.method)("snail", dict(SNAIL_TINY))})
    out = tmp_path_factory.mktemp("snail")
    train(cfg, out, progress=False)
    export_model(out, folder=str(sample_dir), episodes=10, log=lambda m: None)
    return out


@pytest.fixture(scope="session")
def lab(tmp_path_factory):
    """Real OpenSSH servers on 127.0.0.1 playing boards (tests/support/sshd.py)."""
    from tests.support.sshd import SshLab

    lab = SshLab(tmp_path_factory.mktemp("ssh"))
    yield lab
    lab.stop()
