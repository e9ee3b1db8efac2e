"""Keywords end to end: synthetic speech generation, an audio model trained on it, and the shipped
keyword model enrolling and classifying real voices on the board path (no TensorFlow)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgemeta.audio import AudioPreprocess, decode_wav, encode_wav
from edgemeta.host.data.speech import SpeechPlan, excluded, generate, phonemes
from tests.support.builders import REPO
from tests.support.cli import one_line_error, run

KEYWORDS = REPO / "models" / "keywords-conv4"
SPEECH = REPO.parent / "shared" / "data" / "speech_commands_v0.01_subset"
WORDS = ["window", "garden", "paper", "kitten", "marble", "ladder", "pencil", "rocket", "candle", "button",
         "yes", "yesses", "four", "fore", "for", "stopping", "houses", "tree", "free"]

needs_tts = pytest.mark.skipif(shutil.which("espeak-ng") is None or shutil.which("flite") is None,
                               reason="espeak-ng and flite are installed by .ci/run")


@needs_tts
def test_keywords_and_their_near_homophones_stay_out():
    out = excluded(WORDS, phonemes(WORDS))
    assert {"yes", "yesses", "four", "fore", "for", "stopping", "houses", "tree", "free"} <= out
    assert not out & {"window", "garden", "paper", "kitten", "marble"}


@needs_tts
def test_generation_is_reproducible_and_resumes(tmp_path):
    words_file = tmp_path / "words.txt"
    words_file.write_text("\n".join(WORDS) + "\nBoston\nit's\n")
    plan = SpeechPlan(words=4, clips=3, seed=7)
    a = generate(tmp_path / "a", plan, words_file=words_file, log=lambda m: None)
    b = generate(tmp_path / "b", plan, words_file=words_file, log=lambda m: None)
    assert a == b and len(a) == 4 and not set(a) & {"yes", "four", "tree", "Boston", "it's"}
    files = sorted((tmp_path / "a").glob("*/*.wav"))
    assert len(files) == 12
    assert all(f.read_bytes() == (tmp_path / "b" / f.relative_to(tmp_path / "a")).read_bytes() for f in files)
    x, rate = decode_wav(files[0].read_bytes())
    assert rate == 16000 and x.size == 16000 and 0.02 < np.abs(x).max() < 1.0
    # a killed run leaves whole words only; a rerun finishes without rewriting them
    shutil.rmtree(tmp_path / "a" / a[0])
    before = (tmp_path / "a" / a[1] / f"{a[1]}_000.wav").stat().st_mtime_ns
    generate(tmp_path / "a", plan, words_file=words_file, log=lambda m: None)
    assert (tmp_path / "a" / a[0] / f"{a[0]}_002.wav").is_file()
    assert (tmp_path / "a" / a[1] / f"{a[1]}_000.wav").stat().st_mtime_ns == before
    assert "excluded" in (tmp_path / "a" / "SOURCE.md").read_text() and "yes" in (tmp_path / "a" / "excluded.txt").read_text()


def test_missing_engine_is_one_line(tmp_path):
    proc = run("data", "speech", "--out", str(tmp_path / "x"), "--words-file", str(tmp_path / "none.txt"))
    if shutil.which("espeak-ng") and shutil.which("flite"):
        one_line_error(proc, "word list")
    else:
        one_line_error(proc, "apt-get install espeak-ng")


def _clips(word, n, start=0):
    return [str(p) for p in sorted((SPEECH / word).glob("*.wav"))[start:start + n]]


def test_shipped_keyword_model_enrolls_real_voices_and_refuses_bad_audio(tmp_path):
    """Three recordings per keyword enrolled on the board path; the other recordings mostly named right."""
    store = tmp_path / "store"
    words = ["yes", "no", "up", "down", "left"]
    for w in words:
        proc = run("enroll", "--model", str(KEYWORDS), "--store", str(store), "--label", w, *_clips(w, 3))
        assert proc.returncode == 0, proc.stderr
    proc = run("classify", "--model", str(KEYWORDS), "--store", str(store), "--json", *[c for w in words for c in _clips(w, 7, 3)])
    assert proc.returncode == 0, proc.stderr
    answers = json.loads(proc.stdout)
    right = sum(a["label"] == Path(a["file"]).parent.name for a in answers)
    assert len(answers) == 35 and right >= 20  # chance is 7 of 35

    before = (store / "store.npz").read_bytes()
    silent = tmp_path / "silent.wav"
    silent.write_bytes(encode_wav(np.zeros(16000, np.float32), 16000))
    cut = tmp_path / "cut.wav"
    cut.write_bytes(Path(_clips("yes", 1)[0]).read_bytes()[:3000])
    image = REPO / "samples" / "omniglot"
    png = next(image.glob("*/*.png"))
    for bad, fragment in ((silent, "is silent"), (cut, "is truncated"), (png, "is an image, and this model takes")):
        one_line_error(run("enroll", "--model", str(KEYWORDS), "--store", str(store), "--label", "yes", str(bad)), fragment)
    assert (store / "store.npz").read_bytes() == before


@pytest.mark.tf
@needs_tts
def test_an_audio_model_trains_on_generated_speech(tmp_path):
    from edgemeta.host.config import config_from_dict
    from edgemeta.host.training import train

    words_file = tmp_path / "words.txt"
    words_file.write_text("\n".join(WORDS) + "\n")
    generate(tmp_path / "speech", SpeechPlan(words=10, clips=4, seed=0), words_file=words_file, log=lambda m: None)
    cfg = config_from_dict({
        "data": {"kind": "folder", "root": str(tmp_path / "speech")}, "model": {"input": "audio"},
        "train": {"way": 3, "shot": 1, "query": 2, "episodes": 6, "augment_time_mask": 8, "augment_freq_mask": 6},
        "validation": {"every": 6, "episodes": 5, "way": 2, "shot": 1, "query": 2}})
    result = train(cfg, tmp_path / "model", progress=False)
    info = json.loads((tmp_path / "model" / "model.json").read_text())
    assert info["preprocess"] == AudioPreprocess().to_dict() and result is not None
