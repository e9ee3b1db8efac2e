"""The audio front end (edgemeta/audio.py): WAV formats, resampling, log-mel against tf.signal, bad input."""

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgemeta.audio import AudioPreprocess, decode_wav, encode_wav, log_mel_db, loudest_window, mel_matrix, resample
from edgemeta.errors import EdgemetaError
from edgemeta.preprocess import Preprocess, load_images, read_preprocess

PRE = AudioPreprocess()
RATE = 16000


def tone(freq=1000.0, seconds=0.6, rate=RATE, level=0.5, lead=0.2):
    t = np.arange(int(seconds * rate)) / rate
    x = level * np.sin(2 * np.pi * freq * t) * np.hanning(t.size)
    return np.concatenate([np.zeros(int(lead * rate)), x, np.zeros(int(lead * rate))]).astype(np.float32)


def wav_bytes(samples: np.ndarray, rate: int, *, tag=1, bits=16, channels=1, extensible=False) -> bytes:
    """A WAV file written independently of edgemeta's encoder, in any of the formats the reader takes."""
    x = np.repeat(samples[:, None], channels, axis=1)
    if tag == 3:
        pcm = x.astype("<f4" if bits == 32 else "<f8").tobytes()
    elif bits == 8:
        pcm = np.clip(np.round(x * 127 + 128), 0, 255).astype(np.uint8).tobytes()
    elif bits == 24:
        v = np.clip(np.round(x * (2**23 - 1)), -(2**23), 2**23 - 1).astype("<i4")
        pcm = v.view(np.uint8).reshape(-1, 4)[:, :3].tobytes()
    else:
        v = np.clip(np.round(x * (2 ** (bits - 1) - 1)), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
        pcm = v.astype({16: "<i2", 32: "<i4"}[bits]).tobytes()
    align = channels * bits // 8
    if extensible:
        fmt = struct.pack("<HHIIHHHHIH14s", 0xFFFE, channels, rate, rate * align, align, bits, 22, bits, 0, tag,
                          b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71")
    else:
        fmt = struct.pack("<HHIIHH", tag, channels, rate, rate * align, align, bits)
    chunks = b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"LIST" + struct.pack("<I", 3) + b"abc\x00"
    chunks += b"data" + struct.pack("<I", len(pcm)) + pcm
    return b"RIFF" + struct.pack("<I", 4 + len(chunks)) + b"WAVE" + chunks


@pytest.mark.parametrize("tag,bits,channels,extensible", [
    (1, 8, 1, False), (1, 16, 1, False), (1, 24, 1, False), (1, 32, 1, False), (3, 32, 1, False),
    (3, 64, 1, False), (1, 16, 2, False), (1, 24, 2, True), (3, 32, 1, True)])
def test_every_sample_format_reads_as_the_same_sound(tag, bits, channels, extensible):
    x = tone()
    got, rate = decode_wav(wav_bytes(x, RATE, tag=tag, bits=bits, channels=channels, extensible=extensible))
    assert rate == RATE and got.dtype == np.float32 and got.shape == x.shape
    tolerance = 2 / 2 ** (bits - 1) if tag == 1 and bits < 32 else 1e-6
    assert np.max(np.abs(got - x)) <= tolerance
    reference = PRE.spectrogram(loudest_window(x, PRE.clip_length, PRE.hop_length)).astype(int)
    # 8-bit PCM has a noise floor at -48 dBFS: compare the bins above it
    loud = reference > (127 if bits == 8 else -1)
    assert np.abs(PRE.clip(got, rate).astype(int) - reference)[loud].max() <= (8 if bits == 8 else 1)


def test_encoder_round_trip():
    x = tone()
    got, rate = decode_wav(encode_wav(x, RATE))
    assert rate == RATE and np.max(np.abs(got - x)) <= 1 / 32768


@pytest.mark.parametrize("rate", [8000, 11025, 22050, 44100, 48000])
def test_resampled_tone_lands_in_its_mel_band(rate):
    """A 1 kHz tone recorded at any rate peaks in the mel band that holds 1 kHz, as at 16 kHz."""
    x = tone(1000.0, rate=rate)
    y = resample(x, rate, RATE)
    assert abs(y.size - x.size * RATE / rate) <= 1
    spec = PRE.clip(x, rate)[:, :, 0].astype(float)
    band = int(np.argmax(mel_matrix(PRE)[round(1000 / (RATE / 2) * (PRE.fft_size // 2))]))
    assert int(np.argmax(spec.sum(axis=0))) == band
    assert np.abs(np.argmax(spec.sum(axis=0)) - np.argmax(PRE.clip(tone(1000.0), RATE)[:, :, 0].sum(axis=0))) == 0


@pytest.mark.tf
def test_log_mel_matches_tf_signal():
    """The numpy front end against TensorFlow's stft + linear_to_mel_weight_matrix: within 0.01 dB
    (float32 rounding; stated in edgemeta/audio.py's docstring)."""
    import tensorflow as tf

    rng = np.random.default_rng(0)
    x = (tone(700.0) + 0.01 * rng.standard_normal(tone().size)).astype(np.float32)
    w = loudest_window(x, PRE.clip_length, PRE.hop_length)
    power = tf.abs(tf.signal.stft(w, PRE.frame_length, PRE.hop_length, PRE.fft_size)) ** 2
    weights = tf.signal.linear_to_mel_weight_matrix(PRE.mels, PRE.fft_size // 2 + 1, PRE.sample_rate, PRE.fmin, PRE.fmax)
    assert np.abs(weights.numpy() - mel_matrix(PRE)).max() < 1e-4
    mel = tf.tensordot(power, weights, 1).numpy()
    db = 10 * np.log10(np.maximum(mel, 1e-10))
    db = np.maximum(db - db.max(), -PRE.top_db)
    assert np.abs(db - log_mel_db(w, PRE)).max() < 0.01


def test_shorter_clips_are_centred_longer_ones_cut_to_their_loudest_second():
    short = loudest_window(np.ones(100, np.float32), 1000, 10)
    assert short.size == 1000 and short[450:550].all() and not short[:450].any()
    x = np.zeros(5000, np.float32)
    x[3000:3500] = 1.0
    win = loudest_window(x, 1000, 10)
    assert win.sum() == 500


@settings(max_examples=40, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_are_refused_with_one_line(data):
    for blob in (data, b"RIFF" + struct.pack("<I", len(data) + 4) + b"WAVE" + data):
        try:
            samples, rate = decode_wav(blob, "x.wav")
        except EdgemetaError as e:
            assert "\n" not in str(e) and "x.wav" in str(e)
        else:
            assert samples.ndim == 1 and RATE // 2 <= rate * 4  # what did parse is a sound


def _bad_cases():
    x = tone()
    good = wav_bytes(x, RATE)
    loud = np.clip(tone(level=4.0), -1, 1)
    return [
        (b"", "not a WAV file"),
        (b"\x89PNG\r\n\x1a\n" + bytes(40), "not a WAV file"),
        (good[:len(good) // 2], "is truncated"),
        (good[:40], "no data chunk"),
        (wav_bytes(np.zeros(8000, np.float32), RATE), "is silent (digital silence)"),
        (wav_bytes(x * 1e-4, RATE), "is silent (peak"),
        (wav_bytes(loud, RATE), "is clipped"),
        (wav_bytes(x, RATE, channels=3), "3 channels"),
        (wav_bytes(x, 4000), "sample rate of 4000 Hz"),
        (wav_bytes(np.tile(x, 8), RATE), "s long, more than 4 x"),
        (wav_bytes(np.full(100, np.nan, np.float32), RATE, tag=3, bits=32), "NaN"),
        (wav_bytes(np.zeros(0, np.float32), RATE), "holds no samples"),
        (wav_bytes(x, RATE, tag=6, bits=8), "format tag 0x6"),
    ]


@pytest.mark.parametrize("data,fragment", _bad_cases())
def test_bad_audio_is_one_line(data, fragment):
    with pytest.raises(EdgemetaError) as e:
        PRE.file("clip.wav", data)
    assert fragment in str(e.value) and "\n" not in str(e.value) and "clip.wav" in str(e.value)


def test_front_end_reads_its_section_and_refuses_the_wrong_modality(tmp_path):
    assert read_preprocess(PRE.to_dict()) == PRE
    assert read_preprocess({"image_size": 28, "channels": 1, "invert": True}) == Preprocess(28, 1, True)
    with pytest.raises(EdgemetaError, match="must be between 4000 and 48000"):
        read_preprocess({**PRE.to_dict(), "sample_rate": 1000})
    with pytest.raises(EdgemetaError, match=r"preprocess.kind must be \"image\" or \"audio\""):
        read_preprocess({"kind": "video"})
    (tmp_path / "a.wav").write_bytes(encode_wav(tone(), RATE))
    (tmp_path / "b.png").write_bytes(b"\x89PNG")
    with pytest.raises(EdgemetaError, match="is a sound, and this model takes 28x28 grayscale images"):
        load_images([tmp_path / "a.wav"], Preprocess(28, 1, True))
    with pytest.raises(EdgemetaError, match="is an image, and this model takes 1000 ms of 16000 Hz audio"):
        load_images([tmp_path / "b.png"], PRE)
    inputs, names = load_images([tmp_path / "a.wav"], PRE)
    assert inputs.shape == (1, 49, 40, 1) and inputs.dtype == np.uint8 and names == [str(tmp_path / "a.wav")]


def test_gain_does_not_change_the_input():
    """Referenced to its loudest bin, a clip is the same input 30 dB quieter (a phone against a TTS engine)."""
    x = tone() + 0.001 * np.random.default_rng(1).standard_normal(tone().size).astype(np.float32)
    a, b = PRE.clip(x, RATE).astype(int), PRE.clip(x * 0.03, RATE).astype(int)
    assert np.abs(a - b).max() <= 1
