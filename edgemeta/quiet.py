"""Keep native libraries' chatter off the user's terminal."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


@contextlib.contextmanager
def native_stderr_silenced() -> Iterator[None]:
    """Send file descriptor 2 to /dev/null for the block.

    TensorFlow's and LiteRT's C++ code log start-up notes (absl "log messages before
    InitializeLog", oneDNN, "Created TensorFlow Lite XNNPACK delegate") straight to fd 2, and no
    environment variable silences all of them. Python exceptions are unaffected: their messages
    reach the user through the error handling as usual.
    """
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
