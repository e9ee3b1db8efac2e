"""Issue 29's classes of "exit 1 / unexpected / wrong story", swept over the whole CLI: numbers out of
range, a closed stdout, file headers that declare more than they hold, a store another user owns,
and a machine that cannot start another thread. Real subprocesses where the failure is the process's."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import click
import numpy as np
import pytest

from edgemeta.cli import Finite, main

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "models" / "omniglot-conv4"
SAMPLES = REPO / "samples" / "omniglot"
FIRST, SECOND = (sorted((SAMPLES / c).iterdir())[0] for c in sorted(os.listdir(SAMPLES))[:2])


def edgemeta(*args, stdout=subprocess.PIPE, env=None, preexec_fn=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "edgemeta", *map(str, args)], stdout=stdout, stderr=subprocess.PIPE,
                          text=True, env={**os.environ, **(env or {})}, preexec_fn=preexec_fn, timeout=timeout)


def one_line_error(p, fragment=""):
    lines = [x for x in p.stderr.splitlines() if x.strip() and not x.startswith("OpenBLAS")]
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], p.stderr
    assert "Traceback" not in p.stderr and "unexpected" not in p.stderr
    return lines[0]


def commands(group: click.Group = main, path: tuple[str, ...] = ()):
    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            yield from commands(cmd, (*path, name))
        else:
            yield (*path, name), cmd


def numeric_options():
    for path, cmd in commands():
        for p in cmd.params:
            if isinstance(p.type, (click.types.IntParamType, click.types.FloatParamType)):
                yield path, p


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hardening") / "store"
    p = edgemeta("enroll", "--model", MODEL, "--store", folder, "--label", "first", FIRST)
    assert p.returncode == 0, p.stderr
    return folder


# --- numbers ------------------------------------------------------------------------------------

def test_every_numeric_option_of_every_command_has_both_bounds_and_refuses_nan():
    """The class, not the instance: an unbounded int or float anywhere in the CLI fails here."""
    found = list(numeric_options())
    assert len(found) >= 25, found  # the walk reaches the commands
    loose = []
    for path, p in found:
        if not isinstance(p.type, click.types._NumberRangeBase) or p.type.min is None or p.type.max is None:
            loose.append(f"{' '.join(path)} {p.opts[0]}")
        elif isinstance(p.type, click.types.FloatParamType) and not isinstance(p.type, Finite):
            loose.append(f"{' '.join(path)} {p.opts[0]} (takes NaN)")
    assert not loose, loose


@pytest.mark.parametrize("value", ["-1", "99999999999999", "nan", "1e400", "x"])
def test_absurd_numbers_are_one_line_and_exit_2_for_every_option(value):
    from click.testing import CliRunner

    runner = CliRunner()
    for path, p in numeric_options():
        if isinstance(p.type, click.types.IntParamType) and value in ("nan", "1e400") and p.type.min is not None:
            continue  # not a whole number either way: "x" covers it
        if value == "-1" and p.type.min is not None and p.type.min <= -1:
            continue  # a level in dBFS: -1 is a fair value, the other four are not
        group = ["--via", "unix:/nowhere"] if path[0] == "remote" else []
        # the bad option first: click converts in the order given, before a missing required option
        r = runner.invoke(main, [*path[:1], *group, *path[1:], p.opts[0], value])
        lines = [x for x in r.output.splitlines() if x.strip()]
        assert r.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: Invalid value for"), (path, p.opts, r.output)


def test_an_absurd_thread_count_is_refused_before_the_interpreter_sees_it(store):
    """It crashed LiteRT with a signal (exit 139); the library refuses it too, whoever calls it."""
    from edgemeta.errors import EdgemetaError
    from edgemeta.runtime.fewshot import FewShotRuntime

    one_line_error(edgemeta("classify", "--store", store, "--threads", 10**8, FIRST), "--threads")
    for bad in (10**8, 0, -3, 2.5, True):
        with pytest.raises(EdgemetaError, match="threads must be a whole number from 1 to 64"):
            FewShotRuntime(MODEL, threads=bad)


# --- a closed stdout ----------------------------------------------------------------------------

def closed_pipe() -> int:
    r, w = os.pipe()
    os.close(r)
    return w


def test_every_command_survives_a_closed_stdout_for_its_help():
    w = closed_pipe()
    try:
        for path, _ in [((), None), *commands()]:
            via = ["--via", "unix:/nowhere"] if path[:1] == ("remote",) else []  # remote's --via is required
            p = edgemeta(*path[:1], *via, *path[1:], "--help", stdout=w)
            assert p.returncode == 0 and not p.stderr, (path, p.stderr)
    finally:
        os.close(w)


def test_commands_that_print_finish_their_work_into_a_closed_stdout(store, tmp_path):
    w = closed_pipe()
    try:
        for args in (["boards"], ["boards", "show", "rpi5", "--json"], ["classes", "--store", store],
                     ["classes", "--store", store, "--json"], ["classify", "--store", store, "--json", FIRST, SECOND],
                     ["inspect", MODEL / "int8_static.tflite"]):
            p = edgemeta(*args, stdout=w)
            assert p.returncode == 0 and not p.stderr.strip(), (args, p.stderr)
        # a writer whose output nobody reads still writes: the store has the new class
        folder = tmp_path / "s"
        shutil.copytree(store, folder)
        p = edgemeta("enroll", "--store", folder, "--label", "second", SECOND, stdout=w)
        assert p.returncode == 0 and not p.stderr.strip(), p.stderr
    finally:
        os.close(w)
    p = edgemeta("classes", "--store", folder, "--json")
    assert '"second": 1' in p.stdout, p.stdout


# --- headers that declare more than the file holds ----------------------------------------------

def _with_magic(shape, descr) -> bytes:
    out = io.BytesIO()
    np.lib.format.write_array_header_1_0(out, {"descr": descr, "fortran_order": False, "shape": shape})
    return out.getvalue() + b"\0" * 64


def test_a_tiny_npy_that_declares_a_huge_shape_is_one_line_not_memory_error(store, tmp_path):
    before = (store / "store.npz").read_bytes()
    for shape, descr in (((10**6, 10**6), "|u1"), ((2**40, 28, 28), "|u1"), ((3, 28, 28), "|u1"), ((28, 28), "|O")):
        f = tmp_path / "bomb.npy"
        f.write_bytes(_with_magic(shape, descr))
        line = one_line_error(edgemeta("enroll", "--store", store, "--label", "bomb", f), str(f))
        assert "declares" in line and "bytes of data" in line or "Python objects" in line, line
    assert (store / "store.npz").read_bytes() == before


def test_store_and_head_members_that_declare_huge_shapes_are_damaged_not_memory_error(store, tmp_path):
    from edgemeta.arrays import load_npz

    folder = tmp_path / "s"
    shutil.copytree(store, folder)
    real = load_npz(folder / "store.npz")
    with zipfile.ZipFile(folder / "store.npz", "w") as z:
        for name in real:
            z.writestr(f"{name}.npy", _with_magic((10**7, 10**6), "<f4") if name == "embeddings" else _npy_bytes(real[name]))
    damaged = (folder / "store.npz").read_bytes()
    for args in (["classes", "--store", folder], ["enroll", "--store", folder, "--label", "x", SECOND]):
        line = one_line_error(edgemeta(*args), "is damaged")
        assert "embeddings.npy declares 40000000000000 bytes" in line, line
    assert (folder / "store.npz").read_bytes() == damaged
    # compressed members are held to their uncompressed size, which zipfile never inflates past
    out = tmp_path / "c.npz"
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("w.npy", _with_magic((4096, 4096), "<f8")[:-64] + b"\0" * 100)
    with pytest.raises(ValueError, match="declares 134217728 bytes .* but holds 100"):
        load_npz(out)


def _npy_bytes(a: np.ndarray) -> bytes:
    b = io.BytesIO()
    np.save(b, a, allow_pickle=False)
    return b.getvalue()


def test_safe_readers_give_back_what_numpy_wrote(tmp_path):
    from hypothesis import given, settings
    from hypothesis import strategies as st
    from hypothesis.extra import numpy as hnp

    from edgemeta.arrays import load_npy, load_npz

    dtypes = st.sampled_from(["<f4", ">f8", "|u1", "<i4", "<U5", "|b1"])

    @settings(max_examples=60, deadline=None)
    @given(hnp.arrays(dtypes, hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5)), st.booleans(), st.booleans())
    def check(a, fortran, compressed):
        a = np.asfortranarray(a) if fortran else a
        np.save(tmp_path / "a.npy", a)
        (np.savez_compressed if compressed else np.savez)(tmp_path / "a.npz", x=a, y=a.ravel())
        got = [load_npy(tmp_path / "a.npy"), *load_npz(tmp_path / "a.npz").values()]
        for g, want in zip(got, (a, a, a.ravel()), strict=True):
            assert g.dtype == want.dtype and g.shape == want.shape
            assert np.array_equal(g, want, equal_nan=g.dtype.kind == "f")
            if g.size:
                g.flat[0] = g.flat[0]  # writable, as np.load's are

    check()


# --- someone else's store -----------------------------------------------------------------------

needs_root = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"),
                                reason="needs root and setpriv to act as a user without file access (CI runs as root)")


@needs_root
def test_a_store_another_user_owns_says_permission_never_damaged(store, tmp_path):
    folder = tmp_path / "theirs"
    shutil.copytree(store, folder)
    os.chown(folder / "store.npz", 54321, 54321)
    os.chown(folder / ".lock", 54321, 54321)
    os.chown(folder, 54321, 54321)
    (folder / "store.npz").chmod(0o600)
    before = (folder / "store.npz").read_bytes()

    def as_an_ordinary_user(*args):  # root without the capabilities that pass over file modes
        return subprocess.run(["setpriv", "--bounding-set=-dac_override,-dac_read_search", sys.executable, "-m", "edgemeta",
                               *map(str, args)], capture_output=True, text=True, timeout=120)

    for args in (["classes", "--store", folder], ["classify", "--store", folder, FIRST],
                 ["enroll", "--model", MODEL, "--store", folder, "--label", "x", SECOND],
                 ["forget", "--store", folder, "--label", "first"], ["rename", "--store", folder, "first", "y"]):
        line = one_line_error(as_an_ordinary_user(*args), "permission denied")
        assert "uid 54321" in line and "damaged" not in line and "new store" not in line, line
    assert (folder / "store.npz").read_bytes() == before


# --- a machine that cannot start another thread --------------------------------------------------

PIDS = Path("/sys/fs/cgroup/pids")


@pytest.fixture
def one_task_cgroup():
    """A pids cgroup that holds one task: the process itself, no thread more (RLIMIT_NPROC does not bind
    root, a cgroup does)."""
    if os.geteuid() != 0 or not os.access(PIDS, os.W_OK):
        pytest.skip("needs root and a writable pids cgroup (v1) to limit threads (CI runs as root here)")
    group = PIDS / f"edgemeta-test-{os.getpid()}"
    group.mkdir()
    (group / "pids.max").write_text("1")

    def enter():
        with open(group / "cgroup.procs", "w") as f:
            f.write("0")

    yield enter
    group.rmdir()


def test_board_commands_run_where_no_thread_can_start(one_task_cgroup, tmp_path):
    """Before, numpy's OpenBLAS raised SIGINT at import and enroll said "interrupted", exit 130."""
    folder = tmp_path / "s"
    p = edgemeta("enroll", "--model", MODEL, "--store", folder, "--label", "a", FIRST, preexec_fn=one_task_cgroup)
    assert p.returncode == 0, p.stderr
    p = edgemeta("classify", "--store", folder, FIRST, preexec_fn=one_task_cgroup)
    assert p.returncode == 0 and ": a (distance" in p.stdout, p.stderr


def test_what_ran_out_is_named_when_threads_cannot_start(one_task_cgroup, tmp_path):
    p = edgemeta("enroll", "--model", MODEL, "--store", tmp_path / "s", "--label", "a", FIRST,
                 env={"OPENBLAS_NUM_THREADS": "4"}, preexec_fn=one_task_cgroup)
    line = one_line_error(p, "numpy's BLAS could not start its 4 thread(s)")
    assert "interrupted" not in p.stderr and "OPENBLAS_NUM_THREADS=1" in line
    assert not (tmp_path / "s" / "store.npz").exists()
    p = edgemeta("serve", "--model", MODEL, "--store", tmp_path / "s", "--socket", tmp_path / "a.sock", preexec_fn=one_task_cgroup)
    one_line_error(p, "the system refused a new thread")


def test_devices_and_fifos_where_files_belong_are_one_line_not_a_hang(tmp_path):
    one_line_error(edgemeta("inspect", "/dev/zero", timeout=30), "is a character device, not a regular file")
    model = tmp_path / "model"
    shutil.copytree(MODEL, model)
    (model / "manifest.json").unlink()
    os.mkfifo(model / "manifest.json")
    one_line_error(edgemeta("enroll", "--model", model, "--store", tmp_path / "s", "--label", "a", FIRST, timeout=30),
                   "no manifest.json")  # is_file() is false for a FIFO: never opened
    assert not (tmp_path / "s").exists()
