"""Keyword spotting on a live stream (`edgemeta listen`): a sliding window behind a voice-activity gate.

The stream is raw PCM (from `arecord`, a pipe or a file) or a WAV file, at any rate the front end
takes. It moves through in hops of `hop_ms`, each gated; silence costs the gate alone. The gate is an
energy detector over the front end's 20 ms frames against a noise floor that follows the room
(minimum statistics), so steady fan or street noise does not hold it open.

An utterance opens the gate and is answered once, when the gate has stayed shut for `hangover_ms`
(or it has gone on for two windows): its loudest window, taken from the audio around it as a
recorded clip's is (the model was trained and keywords were enrolled on such windows), is embedded
and classified. Choosing among the hops' windows by distance instead picks partial words that
happen to lie near some keyword. "unknown" is the store's open-set test, as for `classify`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

import numpy as np

from edgemeta.audio import AudioPreprocess, decode_wav, loudest_start, loudest_window, resample
from edgemeta.errors import EdgemetaError

# raw PCM sample formats (little-endian, interleaved channels): numpy dtype and full scale
FORMATS = {"s16le": ("<i2", 32768.0), "s32le": ("<i4", 2.0**31), "f32le": ("<f4", 1.0), "u8": ("u1", 128.0)}
MIN_RATE, MAX_RATE = 8_000, 192_000
# the noise floor: this low percentile of the frame levels of the last seconds (minimum statistics), so it
# follows a fan that starts within those seconds, and words with pauses between them never lift it
FLOOR_SECONDS, FLOOR_PERCENTILE = 3.0, 10


@dataclass(frozen=True)
class GateSettings:
    hop_ms: int = 100           # a candidate window every hop
    margin_db: float = 12.0     # a frame is voiced this far above the noise floor ...
    min_dbfs: float = -55.0     # ... and above this absolute level
    hangover_ms: int = 300      # an utterance ends after this much unvoiced audio

    def check(self, clip_ms: int) -> None:
        if not 10 <= self.hop_ms <= clip_ms:
            raise EdgemetaError(f"--hop-ms must be between 10 and the model's window ({clip_ms} ms), got {self.hop_ms}")
        if not (0 <= self.margin_db <= 60 and -100 <= self.min_dbfs <= 0 and 0 <= self.hangover_ms <= 5000):
            raise EdgemetaError("--margin-db must be 0-60, --min-dbfs -100-0 and --hangover-ms 0-5000")


@dataclass
class Detection:
    time_s: float        # where the chosen window starts in the stream
    end_s: float         # where it ends
    label: str
    known: bool
    distance: float

    def to_dict(self) -> dict:
        return {"time_s": round(self.time_s, 3), "end_s": round(self.end_s, 3), "label": self.label, "known": self.known,
                "distance": round(self.distance, 4)}


@dataclass
class Costs:
    """What listening cost: classified windows and their processing time, against the audio's duration."""

    audio_s: float = 0.0
    hops: int = 0
    window_s: list[float] = field(default_factory=list)   # front end + embedding + head, per classified window
    busy_s: float = 0.0   # all processing (gate, windows), process CPU time

    def summary(self) -> dict:
        w = np.array(self.window_s) * 1000 if self.window_s else np.zeros(1)
        return {"audio_s": round(self.audio_s, 3), "hops": self.hops, "windows_classified": len(self.window_s),
                "window_ms_median": round(float(np.median(w)), 3), "window_ms_p90": round(float(np.percentile(w, 90)), 3),
                "cpu_share_of_one_core": round(self.busy_s / self.audio_s, 4) if self.audio_s else 0.0}


class Spotter:
    """Feed it mono float samples at `rate` (`feed`); it returns the detections finished so far.
    `classify(window)` takes one model input (a spectrogram) and returns the head's answer dict."""

    def __init__(self, pre: AudioPreprocess, rate: int, classify, gate: GateSettings = GateSettings()):
        gate.check(pre.clip_ms)
        self.pre, self.rate, self.classify, self.gate = pre, rate, classify, gate
        self.window = round(pre.clip_ms * rate / 1000)
        self.hop = round(gate.hop_ms * rate / 1000)
        self.frame = max(1, round(pre.hop_ms * rate / 1000))  # the gate's frame: the front end's hop
        self.longest = 2 * self.window     # an utterance longer than this is answered, and a new one starts
        self.history = np.zeros(0, np.float32)  # the last samples: an utterance and half a window before it
        self.pending = np.zeros(0, np.float32)
        self.seen = 0                      # samples gated so far
        self.levels = np.zeros(0)          # frame levels of the last FLOOR_SECONDS, dBFS
        self.start: int | None = None      # where the open utterance began (a sample index), None: none open
        self.last_voiced = 0               # where its last voiced hop ended
        self.costs = Costs()

    def feed(self, samples: np.ndarray) -> list[Detection]:
        t0 = time.process_time()
        self.costs.audio_s += samples.size / self.rate
        self.pending = np.concatenate([self.pending, samples.astype(np.float32, copy=False)])
        out = []
        while self.pending.size >= self.hop:
            hop, self.pending = self.pending[:self.hop], self.pending[self.hop:]
            d = self._hop(hop)
            if d:
                out.append(d)
        self.costs.busy_s += time.process_time() - t0
        return out

    def flush(self) -> list[Detection]:
        """At the end of the stream: the utterance still open, if any."""
        t0 = time.process_time()
        d = self._close() if self.start is not None else None
        self.costs.busy_s += time.process_time() - t0
        return [d] if d else []

    def _hop(self, hop: np.ndarray) -> Detection | None:
        self.costs.hops += 1
        keep = self.longest + self.window
        self.history = np.concatenate([self.history[-(keep - hop.size):], hop]) if keep > hop.size else hop[-keep:]
        self.seen += hop.size
        if self._gate(hop):
            if self.start is None:
                self.start = self.seen - hop.size
            self.last_voiced = self.seen
        if self.start is None:
            return None
        if (self.seen - self.last_voiced) * 1000 > self.gate.hangover_ms * self.rate or self.seen - self.start > self.longest:
            return self._close()
        return None

    def _gate(self, hop: np.ndarray) -> bool:
        """Is any frame of this hop voiced: above the noise floor by the margin, and above the absolute level?"""
        n = hop.size // self.frame * self.frame
        frames = hop[:n].reshape(-1, self.frame) if n else hop[None]
        levels = 10 * np.log10(np.mean(frames.astype(np.float64) ** 2, axis=1) + 1e-12)
        keep = max(1, round(FLOOR_SECONDS * self.rate / frames.shape[1]))
        self.levels = np.concatenate([self.levels, levels])[-keep:]
        floor = float(np.percentile(self.levels, FLOOR_PERCENTILE))
        return bool(np.any(levels > max(floor + self.gate.margin_db, self.gate.min_dbfs)))

    def _close(self) -> Detection:
        """Answer the utterance: its loudest model window, with the audio around it (as a clip's is found)."""
        t = time.perf_counter()
        first = self.seen - self.history.size          # stream index of history[0]
        begin = max(first, self.start - self.window // 2)
        region = self.history[begin - first:]
        self.start = None
        x = resample(region, self.rate, self.pre.sample_rate)
        step = self.pre.hop_length
        n = self.pre.clip_length
        at = loudest_start(x, n, step) if x.size > n else 0  # kept for the detection's time
        window = x[at:at + n] if x.size > n else loudest_window(x, n, step)
        answer = self.classify(self.pre.spectrogram(window))
        self.costs.window_s.append(time.perf_counter() - t)
        time_s = begin / self.rate + at / self.pre.sample_rate
        return Detection(time_s, time_s + self.pre.clip_ms / 1000, answer["label"], answer["known"], answer["distance"])


def pcm_chunks(stream: BinaryIO, fmt: str, channels: int, rate: int, chunk_ms: int = 50) -> Iterator[np.ndarray]:
    """Mono float32 chunks of a raw PCM byte stream (channels averaged); a partial last frame is dropped."""
    dtype, scale = FORMATS[fmt]
    width = np.dtype(dtype).itemsize * channels
    size = max(1, round(rate * chunk_ms / 1000)) * width
    rest = b""
    while True:
        data = stream.read(size)
        if not data:
            return
        data = rest + data
        n = len(data) // width * width
        data, rest = data[:n], data[n:]
        if not n:
            continue
        x = np.frombuffer(data, dtype).astype(np.float32)
        if fmt == "u8":
            x -= 128.0
        yield (x / scale).reshape(-1, channels).mean(axis=1)


def wav_chunks(data: bytes, name: str, chunk_ms: int = 50) -> tuple[int, Iterator[np.ndarray]]:
    """(rate, mono float32 chunks) of a whole WAV file, as a stream would deliver it."""
    samples, rate = decode_wav(data, name)
    step = max(1, round(rate * chunk_ms / 1000))
    return rate, (samples[i:i + step] for i in range(0, samples.size, step))


def check_stream(fmt: str, channels: int, rate: int) -> None:
    if fmt not in FORMATS:
        raise EdgemetaError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if not 1 <= channels <= 2:
        raise EdgemetaError(f"--channels must be 1 or 2, got {channels}")
    if not MIN_RATE <= rate <= MAX_RATE:
        raise EdgemetaError(f"--rate must be {MIN_RATE}-{MAX_RATE} Hz, got {rate}")
