"""The audio front end shared by training, evaluation and the board runtime: a WAV file (or a window
of a live stream) -> a log-mel spectrogram stored as a uint8 "image" of shape (frames, mels, 1).

Pure numpy, no TensorFlow: the same function must give the same input on the host and on a board.
Because the spectrogram is a uint8 array like a decoded image, everything downstream (episodes,
training, int8 export, enrollment stores, heads, open set) is the same code for both modalities.

Settings live in the manifest's ``preprocess`` section (``"kind": "audio"``). The spectrogram:
the clip resampled to ``sample_rate`` (band-limited, by FFT), placed in a ``clip_ms`` window (a
shorter clip centred in silence, a longer one cut to its loudest window), framed with a periodic
Hann window, power spectrum, HTK mel filter bank (the formula of ``tf.signal.linear_to_mel_weight_matrix``,
which tests/test_audio.py checks against), 10 log10, referenced to the clip's loudest bin and clipped
at ``-top_db``, then mapped linearly onto 0..255. Referencing to the loudest bin makes the input
independent of recording gain, which differs between a TTS engine and a phone by tens of dB.
"""

from __future__ import annotations

import functools
import math
import os
import stat
import struct
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from edgemeta.errors import EdgemetaError
from edgemeta.schema import Doc, Obj

AUDIO_SUFFIXES = {".wav"}
RATES = (8000, 192000)       # sample rates a file may have
MAX_CHANNELS = 2
SILENT_DBFS = -60.0          # a clip whose peak is below this holds no sound to learn from
CLIPPED_SHARE = 0.05         # more than this share of samples at full scale: the recording is clipped
MAX_CLIP_FACTOR = 4          # a file may be at most this many windows long (the loudest one is kept)
DEFAULT_MAX_AUDIO_BYTES = 64 * 2**20
_FULL_SCALE = 0.99
_PCM, _FLOAT, _EXTENSIBLE = 1, 3, 0xFFFE


@dataclass(frozen=True)
class AudioPreprocess:
    """How a sound becomes a model input (the manifest's preprocess section with kind "audio").

    sample_rate: Hz the clip is resampled to. clip_ms: the window the model hears.
    frame_ms / hop_ms: the STFT frame and step. fft_size: FFT length (>= the frame).
    mels, fmin, fmax: the mel filter bank. top_db: dynamic range kept below the loudest bin.
    """

    sample_rate: int = 16000
    clip_ms: int = 1000
    frame_ms: int = 30
    hop_ms: int = 20
    fft_size: int = 512
    mels: int = 40
    fmin: float = 20.0
    fmax: float = 7600.0
    top_db: float = 80.0

    kind = "audio"
    suffixes = AUDIO_SUFFIXES
    channels = 1

    def __post_init__(self) -> None:
        if not 4000 <= self.sample_rate <= 48000:
            raise EdgemetaError(f"audio sample_rate must be between 4000 and 48000 Hz, got {self.sample_rate}")
        if not 100 <= self.clip_ms <= 10000:
            raise EdgemetaError(f"audio clip_ms must be between 100 and 10000, got {self.clip_ms}")
        if not 0 < self.hop_ms <= self.frame_ms <= self.clip_ms // 2:
            raise EdgemetaError(f"audio frame_ms and hop_ms must satisfy 0 < hop_ms <= frame_ms <= clip_ms / 2, "
                                f"got frame_ms {self.frame_ms}, hop_ms {self.hop_ms}")
        if self.fft_size < self.frame_length or self.fft_size & (self.fft_size - 1):
            raise EdgemetaError(f"audio fft_size must be a power of two of at least the frame length "
                                f"({self.frame_length} samples), got {self.fft_size}")
        if not 8 <= self.mels <= 128:
            raise EdgemetaError(f"audio mels must be between 8 and 128, got {self.mels}")
        if not 0 <= self.fmin < self.fmax <= self.sample_rate / 2:
            raise EdgemetaError(f"audio fmin/fmax must satisfy 0 <= fmin < fmax <= sample_rate / 2, "
                                f"got {self.fmin} and {self.fmax}")
        if not 20 <= self.top_db <= 120:
            raise EdgemetaError(f"audio top_db must be between 20 and 120, got {self.top_db}")

    @property
    def frame_length(self) -> int:
        return self.sample_rate * self.frame_ms // 1000

    @property
    def hop_length(self) -> int:
        return self.sample_rate * self.hop_ms // 1000

    @property
    def clip_length(self) -> int:
        return self.sample_rate * self.clip_ms // 1000

    @property
    def frames(self) -> int:
        return 1 + (self.clip_length - self.frame_length) // self.hop_length

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.frames, self.mels, 1)

    @property
    def input_side(self) -> int:
        return min(self.frames, self.mels)

    def describe(self) -> str:
        return (f"{self.clip_ms} ms of {self.sample_rate} Hz audio as {self.frames} x {self.mels} log-mel "
                f"({self.frame_ms} ms frames every {self.hop_ms} ms, {self.top_db:g} dB range)")

    def to_dict(self) -> dict:
        return {"kind": self.kind} | asdict(self)

    @classmethod
    def from_dict(cls, d: dict, doc: Doc | None = None, where: str = "preprocess") -> AudioPreprocess:
        section = Obj(doc or Doc("", "fix the model's preprocess section or re-export the model"), d, where)
        section.get("kind", str, choices=("audio",))
        ints = {k: section.get(k, int) for k in ("sample_rate", "clip_ms", "frame_ms", "hop_ms", "fft_size", "mels")}
        floats = {k: float(section.get(k, float)) for k in ("fmin", "fmax", "top_db")}
        return cls(**ints, **floats)

    # --- decoding -------------------------------------------------------------------------

    def file(self, path: str | Path, data: bytes | None = None, *, limits=None) -> np.ndarray:
        """One WAV file (or its bytes, named by path) -> (frames, mels, 1) uint8; see `decode_wav`."""
        max_bytes = getattr(limits, "max_bytes", DEFAULT_MAX_AUDIO_BYTES)
        name = str(path)
        raw = data if data is not None else _read_bounded(Path(path), name, max_bytes)
        if len(raw) > max_bytes:
            raise EdgemetaError(f"audio {name} is {len(raw)} bytes, more than the limit of {max_bytes}")
        samples, rate = decode_wav(raw, name)
        return self.clip(samples, rate, name)

    def clip(self, samples: np.ndarray, rate: int, name: str = "audio") -> np.ndarray:
        """Mono float samples at `rate` -> the model input, checked for silence, clipping and length."""
        if samples.size == 0:
            raise EdgemetaError(f"audio {name} holds no samples; record it again")
        peak = float(np.max(np.abs(samples)))
        if peak <= 10 ** (SILENT_DBFS / 20):
            level = "digital silence" if peak == 0 else f"peak {20 * math.log10(peak):.0f} dBFS"
            raise EdgemetaError(f"audio {name} is silent ({level}); record it again closer to the microphone")
        clipped = float(np.mean(np.abs(samples) >= _FULL_SCALE))
        if clipped > CLIPPED_SHARE:
            raise EdgemetaError(f"audio {name} is clipped ({100 * clipped:.0f}% of its samples at full scale); "
                                "record it again at a lower gain")
        seconds = samples.size / rate
        if seconds > MAX_CLIP_FACTOR * self.clip_ms / 1000:
            raise EdgemetaError(f"audio {name} is {seconds:.1f} s long, more than {MAX_CLIP_FACTOR} x the model's "
                                f"{self.clip_ms / 1000:g} s window; trim it to the word, or use `edgemeta listen` for a stream")
        x = resample(samples, rate, self.sample_rate)
        return self.spectrogram(loudest_window(x, self.clip_length, self.hop_length))

    def spectrogram(self, window: np.ndarray) -> np.ndarray:
        """Exactly clip_length samples -> (frames, mels, 1) uint8."""
        db = log_mel_db(window, self)
        scaled = np.round((db + self.top_db) * (255.0 / self.top_db))
        return np.clip(scaled, 0, 255).astype(np.uint8)[:, :, None]


def loudest_window(x: np.ndarray, length: int, step: int) -> np.ndarray:
    """`length` samples of x: centred in zeros when x is shorter, else its loudest window (steps of `step`)."""
    if x.size <= length:
        out = np.zeros(length, np.float32)
        start = (length - x.size) // 2
        out[start:start + x.size] = x
        return out
    best = loudest_start(x, length, step)
    return x[best:best + length].astype(np.float32)


def loudest_start(x: np.ndarray, length: int, step: int) -> int:
    """Where the loudest `length` samples of x (longer than that) start, in steps of `step`."""
    energy = np.concatenate([[0.0], np.cumsum(x.astype(np.float64) ** 2)])
    starts = np.arange(0, x.size - length + 1, step)
    return int(starts[np.argmax(energy[starts + length] - energy[starts])])


def resample(x: np.ndarray, rate: int, target: int) -> np.ndarray:
    """Band-limited resampling by FFT (the spectrum cut or zero-extended), float32 out."""
    if rate == target:
        return x.astype(np.float32, copy=False)
    n_out = max(1, round(x.size * target / rate))
    spec = np.fft.rfft(x.astype(np.float64))
    keep = min(spec.size, n_out // 2 + 1)
    out_spec = np.zeros(n_out // 2 + 1, np.complex128)
    out_spec[:keep] = spec[:keep]
    return (np.fft.irfft(out_spec, n_out) * (n_out / x.size)).astype(np.float32)


def hertz_to_mel(f):
    return 1127.0 * np.log1p(np.asarray(f, np.float64) / 700.0)


@functools.lru_cache(maxsize=8)
def mel_matrix(pre: AudioPreprocess) -> np.ndarray:
    """(fft_size // 2 + 1, mels) triangular HTK-mel weights, as tf.signal.linear_to_mel_weight_matrix
    builds them (the DC bin weighs nothing)."""
    bins = pre.fft_size // 2 + 1
    freqs = np.linspace(0.0, pre.sample_rate / 2, bins)[1:]
    spectrum_mel = hertz_to_mel(freqs)[:, None]
    edges = np.linspace(hertz_to_mel(pre.fmin), hertz_to_mel(pre.fmax), pre.mels + 2)
    lower, center, upper = edges[:-2], edges[1:-1], edges[2:]
    rising = (spectrum_mel - lower) / (center - lower)
    falling = (upper - spectrum_mel) / (upper - center)
    weights = np.maximum(0.0, np.minimum(rising, falling))
    return np.pad(weights, [[1, 0], [0, 0]]).astype(np.float32)


@functools.lru_cache(maxsize=8)
def _hann(length: int) -> np.ndarray:
    return (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(length) / length)).astype(np.float32)  # periodic


def log_mel_db(window: np.ndarray, pre: AudioPreprocess) -> np.ndarray:
    """clip_length samples -> (frames, mels) float32 dB relative to the loudest bin, clipped at -top_db."""
    n, hop = pre.frame_length, pre.hop_length
    idx = np.arange(pre.frames)[:, None] * hop + np.arange(n)[None, :]
    frames = window.astype(np.float32)[idx] * _hann(n)
    power = np.abs(np.fft.rfft(frames, pre.fft_size)).astype(np.float32) ** 2
    mel = power @ mel_matrix(pre)
    db = 10.0 * np.log10(np.maximum(mel, 1e-10))
    return np.maximum(db - db.max(), -pre.top_db).astype(np.float32)


# --- WAV files ------------------------------------------------------------------------------


def decode_wav(data: bytes, name: str = "audio") -> tuple[np.ndarray, int]:
    """RIFF WAV bytes -> (mono float32 samples in [-1, 1], sample rate). PCM 8/16/24/32-bit and float
    32/64-bit, plain or WAVE_FORMAT_EXTENSIBLE, 1 or 2 channels (averaged). One line for anything else."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        what = "an RF64 file (over 4 GB)" if data[:4] == b"RF64" else "not a WAV file (no RIFF/WAVE header)"
        raise EdgemetaError(f"cannot read audio {name}: {what}; give a .wav recording")
    fmt, pcm, pos = None, None, 12
    while pos + 8 <= len(data):
        tag, size = data[pos:pos + 4], struct.unpack_from("<I", data, pos + 4)[0]
        body = data[pos + 8:pos + 8 + size]
        if tag == b"fmt ":
            if len(body) < 16:
                raise EdgemetaError(f"cannot read audio {name}: its format chunk is truncated; record or export it again")
            fmt = body
        elif tag == b"data":
            if len(body) < size:
                raise EdgemetaError(f"audio {name} is truncated: its header promises {size} bytes of samples, "
                                    f"the file holds {len(body)}; copy or record it again")
            pcm = body
            break
        pos += 8 + size + (size & 1)
    if fmt is None or pcm is None:
        raise EdgemetaError(f"cannot read audio {name}: no {'format' if fmt is None else 'data'} chunk; "
                            "the file is damaged or truncated")
    tag, channels, rate, _, align, bits = struct.unpack_from("<HHIIHH", fmt)
    if tag == _EXTENSIBLE and len(fmt) >= 26:
        tag = struct.unpack_from("<H", fmt, 24)[0]  # the sub-format GUID starts with the plain format tag
    if not 1 <= channels <= MAX_CHANNELS:
        raise EdgemetaError(f"audio {name} has {channels} channels; give a mono or stereo recording")
    if not RATES[0] <= rate <= RATES[1]:
        raise EdgemetaError(f"audio {name} has a sample rate of {rate} Hz; give one between {RATES[0]} and {RATES[1]} Hz")
    width = bits // 8
    dtype = {(_PCM, 1): "u1", (_PCM, 2): "<i2", (_PCM, 3): "i3", (_PCM, 4): "<i4",
             (_FLOAT, 4): "<f4", (_FLOAT, 8): "<f8"}.get((tag, width))
    if dtype is None or bits % 8 or align != width * channels:
        kind = {_PCM: "integer PCM", _FLOAT: "float"}.get(tag, f"format tag {tag:#x}")
        raise EdgemetaError(f"audio {name} is {bits}-bit {kind}; give 8, 16, 24 or 32-bit PCM or 32/64-bit float")
    usable = len(pcm) - len(pcm) % align
    if usable == 0:
        raise EdgemetaError(f"audio {name} holds no samples; record it again")
    raw = pcm[:usable]
    if dtype == "u1":
        x = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif dtype == "i3":
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        x = ((b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)) << 8 >> 8).astype(np.float32) / 2**23
    elif dtype[1] == "i":
        x = np.frombuffer(raw, dtype).astype(np.float32) / float(2 ** (bits - 1))
    else:
        x = np.frombuffer(raw, dtype).astype(np.float32)
        if not np.all(np.isfinite(x)):
            raise EdgemetaError(f"audio {name} holds NaN or infinite samples; export it again")
        x = np.clip(x, -1.0, 1.0)
    return x.reshape(-1, channels).mean(axis=1), rate


def encode_wav(samples: np.ndarray, rate: int) -> bytes:
    """Mono float samples -> 16-bit PCM WAV bytes."""
    pcm = (np.clip(samples, -1.0, 32767 / 32768) * 32768).astype("<i2").tobytes()
    header = struct.pack("<4sI4s4sIHHIIHH4sI", b"RIFF", 36 + len(pcm), b"WAVE", b"fmt ", 16, _PCM, 1, rate,
                         rate * 2, 2, 16, b"data", len(pcm))
    return header + pcm


def _read_bounded(path: Path, name: str, max_bytes: int) -> bytes:
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            if stat.S_ISREG(st.st_mode) and st.st_size > max_bytes:
                raise EdgemetaError(f"audio {name} is {st.st_size} bytes, more than the limit of {max_bytes}")
            return f.read(max_bytes + 1)
    except FileNotFoundError:
        raise EdgemetaError(f"audio {name} does not exist") from None
    except IsADirectoryError:
        raise EdgemetaError(f"audio {name} is a folder, not a .wav file") from None
    except OSError as e:
        raise EdgemetaError(f"cannot read audio {name}: {e.strerror or e}") from None
