import subprocess
import sys

import pytest

from edgemeta.boards import list_boards, load_board
from edgemeta.errors import EdgemetaError

REQUIRED = {"rpi5", "rpi4", "rpi-zero2w", "rpi3b-32bit", "coral-devboard", "coral-devboard-mini", "rpi-coral-usb", "generic-x86_64"}


def test_every_profile_is_complete():
    boards = {b.name: b for b in list_boards()}
    assert REQUIRED <= set(boards)
    for b in boards.values():
        r = b.raw
        for key in ("title", "arch", "os", "python", "memory_mb", "threads"):
            assert key in r, (b.name, key)
        assert {"package", "version", "module", "wheel_platforms", "op_table"} <= set(b.runtime), b.name
        assert b.variant in r["model"]["accepts"] and "device" in r["serial"] and "baud" in r["serial"]
        b.max_op_versions()  # the table exists
        # what TOOLCHAIN.md records: no ai-edge-litert on armv7l, tflite-runtime 2.14 needs numpy < 2
        if r["arch"] == "armv7l":
            assert b.runtime["package"] == "tflite-runtime"
        if b.runtime["package"] == "tflite-runtime":
            assert b.runtime["numpy"] == "numpy<2" and b.max_op_versions()["FULLY_CONNECTED"] < 12
        assert all(arch_tag.endswith(r["arch"]) for arch_tag in b.runtime["wheel_platforms"])


def test_op_check_names_the_problem():
    b = load_board("rpi3b-32bit")
    assert b.check_ops({"CONV_2D": 3}) == []
    assert "loads up to v10" in b.check_ops({"FULLY_CONNECTED": 12})[0]
    assert "not in" in b.check_ops({"STABLEHLO_COMPOSITE": 1})[0]
    assert load_board("rpi5").check_ops({"FULLY_CONNECTED": 12}) == []


def test_unknown_board():
    with pytest.raises(EdgemetaError, match="unknown board 'pi9'; known boards: coral-devboard"):
        load_board("pi9")


def test_cli_lists_and_shows():
    out = subprocess.run([sys.executable, "-m", "edgemeta", "boards"], capture_output=True, text=True).stdout
    assert all(name in out for name in REQUIRED) and "not supported" in out
    out = subprocess.run([sys.executable, "-m", "edgemeta", "boards", "show", "rpi-coral-usb"], capture_output=True, text=True).stdout
    assert "libedgetpu.so.1" in out and "tflite-runtime==2.14.0" in out
