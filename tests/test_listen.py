"""`edgemeta listen`: keywords spotted in a stream of real recordings, on the board path (no TensorFlow)."""

import json
import subprocess
import sys

import numpy as np
import pytest

from edgemeta.audio import decode_wav, encode_wav
from edgemeta.runtime.listen import FLOOR_SECONDS, GateSettings, Spotter
from tests.support.builders import REPO
from tests.support.cli import one_line_error, run

KEYWORDS = REPO / "models" / "keywords-conv4"
SAMPLES = REPO / "samples" / "speech_commands"
WORDS = ["yes", "no", "up", "stop", "left"]
RATE = 16_000


def _clips(word, n, start=0):
    return sorted((SAMPLES / word).glob("*.wav"))[start:start + n]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    folder = tmp_path_factory.mktemp("listen") / "store"
    for w in WORDS:
        proc = run("enroll", "--model", str(KEYWORDS), "--store", str(folder), "--label", w, *map(str, _clips(w, 3)))
        assert proc.returncode == 0, proc.stderr
    return folder


@pytest.fixture(scope="module")
def stream(tmp_path_factory):
    """Four unseen recordings of each keyword, with room noise at -50 dBFS and gaps of 0.4-1.5 s between them."""
    rng = np.random.default_rng(0)
    parts, truth, t = [rng.normal(0, 10 ** (-50 / 20), RATE).astype(np.float32)], [], 1.0
    files = [(w, f) for w in WORDS for f in _clips(w, 4, 3)]
    for i in rng.permutation(len(files)):
        word, f = files[i]
        x, _ = decode_wav(f.read_bytes())
        parts.append(x + rng.normal(0, 10 ** (-50 / 20), x.size).astype(np.float32))
        truth.append((t, t + x.size / RATE, word, f))
        t += x.size / RATE
        gap = rng.uniform(0.4, 1.5)
        parts.append(rng.normal(0, 10 ** (-50 / 20), int(gap * RATE)).astype(np.float32))
        t += int(gap * RATE) / RATE
    audio = np.concatenate(parts)
    folder = tmp_path_factory.mktemp("stream")
    (folder / "stream.wav").write_bytes(encode_wav(audio, RATE))
    return folder / "stream.wav", audio, truth


def _listen(store, *args, stdin=None):
    proc = subprocess.run([sys.executable, "-m", "edgemeta", "listen", "--store", str(store), "--json", *map(str, args)],
                          input=stdin, capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()
    lines = [json.loads(line) for line in proc.stdout.decode().splitlines()]
    return lines[:-1], lines[-1]["costs"]


def test_each_utterance_is_one_detection_answered_as_its_recording_is(store, stream):
    wav, _, truth = stream
    found, costs = _listen(store, "--show-unknown", wav)
    # the gate finds every utterance once, and puts it where it was said
    assert len(found) == len(truth)
    for d, (start, end, _, _) in zip(found, truth, strict=True):
        assert start - 0.5 <= d["time_s"] and d["end_s"] <= end + 0.6, (d, start, end)
    # the window chosen is the recording's own: the same answer as classifying that file
    proc = run("classify", "--store", str(store), "--json", *[str(f) for *_, f in truth])
    files = json.loads(proc.stdout)
    same = sum(d["label"] == a["label"] for d, a in zip(found, files, strict=True))
    right = sum(d["label"] == word for d, (_, _, word, _) in zip(found, truth, strict=True))
    assert same >= len(truth) - 2 and right >= 12, (same, right)  # 20 utterances, chance is 4
    # one window classified per utterance; the rest of the stream costs the gate alone
    assert costs["windows_classified"] == len(truth) and costs["hops"] > 5 * len(truth)
    assert 0 < costs["cpu_share_of_one_core"] < 0.5


def test_raw_pcm_on_stdin_any_rate_and_stereo_give_the_same_detections(store, stream):
    wav, audio, _ = stream
    found, _ = _listen(store, "--show-unknown", wav)
    pcm16 = (np.clip(audio, -1, 1) * 32767).astype("<i2")
    raw, _ = _listen(store, "--show-unknown", "-", stdin=pcm16.tobytes())
    assert [d["label"] for d in raw] == [d["label"] for d in found]
    # 48 kHz stereo float: resampled per window, channels averaged
    from edgemeta.audio import resample

    x48 = resample(audio, RATE, 48_000)
    stereo = np.stack([x48, x48], axis=1).astype("<f4")
    st, _ = _listen(store, "--show-unknown", "--format", "f32le", "--rate", "48000", "--channels", "2", "-", stdin=stereo.tobytes())
    assert len(st) == len(found)
    assert sum(a["label"] == b["label"] for a, b in zip(st, found, strict=True)) >= len(found) - 2


def test_silence_and_steady_noise_keep_the_gate_shut():
    calls = []
    spotter = Spotter(_pre(), RATE, lambda x: calls.append(x) or {"label": "x", "known": True, "distance": 0.0}, GateSettings())
    rng = np.random.default_rng(1)
    found = spotter.feed(np.zeros(3 * RATE, np.float32))
    assert found == [] and calls == []
    # a fan at -30 dBFS that starts and keeps going: its onset opens the gate until the floor has
    # followed it (FLOOR_SECONDS), never after
    found += spotter.feed(rng.normal(0, 10 ** (-30 / 20), 20 * RATE).astype(np.float32))
    found += spotter.flush()
    assert 1 <= len(found) <= 2 and len(calls) == len(found)
    assert all(d.time_s < 3 + FLOOR_SECONDS for d in found)
    assert spotter.costs.hops == 230


def test_unknown_words_are_kept_out_by_a_calibrated_store(store, stream, tmp_path):
    """Other words (not enrolled) than the five keywords: the calibrated store answers most of them unknown."""
    import shutil

    s = tmp_path / "store"
    shutil.copytree(store, s)
    assert run("calibrate", "--store", str(s), "--false-accept", "0.1").returncode == 0
    rng = np.random.default_rng(2)
    others = [f for w in ("down", "right", "on", "off", "go") for f in _clips(w, 4)]
    parts = []
    for f in others:
        x, _ = decode_wav(f.read_bytes())
        parts += [x, rng.normal(0, 10 ** (-50 / 20), RATE).astype(np.float32)]
    (tmp_path / "others.wav").write_bytes(encode_wav(np.concatenate(parts), RATE))
    found, _ = _listen(s, "--show-unknown", tmp_path / "others.wav")
    assert len(found) == len(others)
    quiet, _ = _listen(s, tmp_path / "others.wav")
    assert len(quiet) == sum(d["known"] for d in found) < len(others) / 2


def test_bad_streams_and_settings_are_one_line(store, tmp_path):
    one_line_error(run("listen", "--store", str(store), "--format", "s24le", "-"), "--format must be one of")
    one_line_error(run("listen", "--store", str(store), "--hop-ms", "5000", "-"), "--hop-ms must be between 10")
    one_line_error(run("listen", "--store", str(store), "--rate", "4000", "-"), "--rate")
    png = next((REPO / "samples" / "omniglot").glob("*/*.png"))
    one_line_error(run("listen", "--store", str(store), str(png)), "not a WAV")
    one_line_error(run("listen", "--store", str(tmp_path / "none"), "--model", str(KEYWORDS), "-"), "does not exist; enroll")
    empty = tmp_path / "empty"
    assert run("enroll", "--model", str(KEYWORDS), "--store", str(empty), "--label", "yes", str(_clips("yes", 1)[0])).returncode == 0
    assert run("forget", "--store", str(empty), "--label", "yes").returncode == 0
    one_line_error(run("listen", "--store", str(empty), "-"), "has no keywords; enroll some first")
    image_store = tmp_path / "images"
    assert run("enroll", "--model", str(REPO / "models" / "omniglot-conv4"), "--store", str(image_store), "--label", "a",
               str(png)).returncode == 0
    one_line_error(run("listen", "--store", str(image_store), "-"), "listen needs a keyword model")


def test_the_audio_demo_enrolls_five_keywords_from_three_recordings():
    proc = run("demo", "--audio", "--episodes", "3", "--json")
    assert proc.returncode == 0, proc.stderr
    s = json.loads(proc.stdout)
    assert (s["input"], s["way"], s["shot"], s["episodes"]) == ("audio", 5, 3, 3)
    assert s["queries"] == 3 * 5 * 7 and s["accuracy"] > 50  # chance is 20
    assert s["reference"] is None and s["alphabets"] is None


def _pre():
    from edgemeta.audio import AudioPreprocess

    return AudioPreprocess()
