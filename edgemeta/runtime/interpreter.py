"""TFLite interpreter loading and embedding, for boards and hosts alike.

The interpreter comes from ai_edge_litert (preferred), else tflite_runtime, else TensorFlow's
tf.lite (host fallback; deprecated there). Inputs are quantised and outputs dequantised with the
parameters the model itself carries, so the caller always deals in uint8 images in and float32
embeddings out.
"""

from __future__ import annotations

import ctypes
import importlib
import os
import warnings
from pathlib import Path

import numpy as np

from edgemeta.errors import EdgemetaError
from edgemeta.limits import MAX_THREADS
from edgemeta.quiet import native_stderr_silenced

EDGETPU_LIB = "libedgetpu.so.1"
RUNTIMES = ("ai_edge_litert", "tflite_runtime", "tensorflow")


def interpreter_module(prefer: str | None = None):
    """(name, module exposing Interpreter and load_delegate) of the first importable runtime,
    or of `prefer` / $EDGEMETA_RUNTIME (one of RUNTIMES) when given."""
    prefer = prefer or os.environ.get("EDGEMETA_RUNTIME") or None
    if prefer and prefer not in RUNTIMES:
        raise EdgemetaError(f"unknown interpreter runtime {prefer!r}; choose one of: {', '.join(RUNTIMES)}")
    order = (prefer,) if prefer else RUNTIMES
    for name in order:
        try:
            if name == "tensorflow":
                # last resort on a host that has TensorFlow but no board interpreter (DESIGN.md);
                # boards always have ai_edge_litert or tflite_runtime, so this never runs there
                return name, importlib.import_module("tensorflow").lite
            return name, importlib.import_module(f"{name}.interpreter")
        except ImportError:
            continue
    raise EdgemetaError("no TFLite interpreter is installed; install one: pip install ai-edge-litert "
                        "(or tflite-runtime on 32-bit Raspberry Pi OS)")


def runtime_version(name: str) -> str:
    from importlib import metadata

    dist = {"ai_edge_litert": "ai-edge-litert", "tflite_runtime": "tflite-runtime", "tensorflow": "tensorflow"}[name]
    for candidate in (dist, "tensorflow-cpu") if name == "tensorflow" else (dist,):
        try:
            return metadata.version(candidate)
        except metadata.PackageNotFoundError:
            continue
    return "unknown"


class Embedder:
    """uint8 images (n, H, W, C) -> float32 embeddings (n, dim) through a .tflite backbone.

    threads: interpreter threads (>= 1). edgetpu: load the Edge TPU delegate (device string as
    pycoral takes it: "usb", "usb:0", "pci", ":0"; "" for the first one). xnnpack: False turns
    the default XNNPACK delegate off (to compare, or where it misbehaves).
    """

    def __init__(self, path: str | Path, threads: int = 1, edgetpu: str | None = None, xnnpack: bool = True,
                 runtime: str | None = None):
        self.path = Path(path)
        self.runtime, self.interpreter = open_interpreter(path, threads, edgetpu, xnnpack, runtime)
        self._in = self.interpreter.get_input_details()[0]
        self._out = self.interpreter.get_output_details()[0]
        self.input_shape = tuple(int(s) for s in self._in["shape"][1:])
        self.static_batch = int(self._in["shape_signature"][0]) if self._in["shape_signature"][0] > 0 else None
        self.dim = int(self._out["shape"][-1])
        self._batch = int(self._in["shape"][0])

    @property
    def input_dtype(self) -> str:
        return np.dtype(self._in["dtype"]).name

    def _quantise(self, images: np.ndarray) -> np.ndarray:
        x = images.astype(np.float32) * np.float32(1.0 / 255.0)
        scale, zero = self._in["quantization"]
        if self._in["dtype"] in (np.int8, np.uint8) and scale:
            info = np.iinfo(self._in["dtype"])
            return np.clip(np.round(x / scale) + zero, info.min, info.max).astype(self._in["dtype"])
        return x

    def _dequantise(self, y: np.ndarray) -> np.ndarray:
        scale, zero = self._out["quantization"]
        if self._out["dtype"] in (np.int8, np.uint8) and scale:
            return (y.astype(np.float32) - zero) * np.float32(scale)
        return y.astype(np.float32)

    def _run(self, x: np.ndarray) -> np.ndarray:
        if x.shape[0] != self._batch:
            self.interpreter.resize_tensor_input(self._in["index"], [x.shape[0], *self.input_shape])
            self.interpreter.allocate_tensors()
            self._batch = x.shape[0]
        self.interpreter.set_tensor(self._in["index"], x)
        self.interpreter.invoke()
        return self.interpreter.get_tensor(self._out["index"])

    def __call__(self, images: np.ndarray, batch: int = 64) -> np.ndarray:
        images = np.asarray(images)
        if images.ndim == 3:
            images = images[None]
        if images.shape[1:] != self.input_shape:
            raise EdgemetaError(f"images of shape {images.shape[1:]} do not fit the model input {self.input_shape}")
        step = self.static_batch or batch
        out = np.empty((len(images), self.dim), dtype=np.float32)
        for i in range(0, len(images), step):
            chunk = self._quantise(images[i:i + step])
            n = len(chunk)
            if self.static_batch and n < step:  # pad the last chunk of a static-batch model
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], step - n, axis=0)])
            out[i:i + n] = self._dequantise(self._run(chunk))[:n]
        return out


def open_interpreter(path: str | Path, threads: int = 1, edgetpu: str | None = None, xnnpack: bool = True,
                     runtime: str | None = None):
    """(runtime name, a loaded interpreter with its tensors allocated), or one error line saying why
    the file cannot be loaded."""
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= MAX_THREADS:
        raise EdgemetaError(f"threads must be a whole number from 1 to {MAX_THREADS}, got {threads!r}")
    path = Path(path)
    if not path.is_file():
        raise EdgemetaError(f"model file {path} does not exist")
    name, mod = interpreter_module(runtime)
    kwargs: dict = {"model_path": str(path), "num_threads": threads}
    if edgetpu is not None:
        kwargs["experimental_delegates"] = [load_edgetpu(mod, edgetpu)]
    if not xnnpack:
        kwargs["experimental_op_resolver_type"] = mod.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    try:
        with warnings.catch_warnings(), native_stderr_silenced():
            warnings.simplefilter("ignore")  # tf.lite's deprecation notice
            interpreter = mod.Interpreter(**kwargs)
            interpreter.allocate_tensors()
    except (ValueError, RuntimeError) as e:
        raise EdgemetaError(f"{path} cannot be loaded by {name} ({str(e).strip().splitlines()[0][:200]}); "
                            "the file is damaged or needs a newer runtime (check with `edgemeta inspect`)") from None
    return name, interpreter


def load_edgetpu(mod, device: str = ""):
    """The Edge TPU delegate, or an error that names the fix."""
    options = {"device": device} if device else {}
    try:
        # Load the library ourselves first: when it is missing, the runtime's Delegate fails half-built
        # and its __del__ prints an AttributeError traceback at exit, under our one-line error.
        ctypes.CDLL(EDGETPU_LIB)
        return mod.load_delegate(EDGETPU_LIB, options)
    except (OSError, ValueError) as e:  # a missing library raises OSError, not the documented ValueError
        raise EdgemetaError(f"cannot load the Edge TPU delegate {EDGETPU_LIB} ({str(e).strip()[:120]}); install the Edge TPU "
                            "runtime (apt-get install libedgetpu1-std from Coral's repository), plug in the accelerator "
                            "and add your user to the plugdev group, or run without --edgetpu") from None
