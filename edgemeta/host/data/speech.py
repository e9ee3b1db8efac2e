"""Synthetic spoken words for meta-training keyword models: `edgemeta data speech`.

Words come from a word list (Debian's wamerican, /usr/share/dict/words), spoken by the text-to-speech
engines Debian packages (espeak-ng with its English accents and voice variants, flite with its
voices) at random rates and pitches, then made less clean than TTS: speed perturbation, a random
microphone band, room reverberation, noise at a random SNR, a random place in the one-second window.
Every clip is drawn from its own seeded generator, so the same seed gives the same files.

The test keywords (the 30 words of Speech Commands, real voices, ../shared/data/...) and their
near homophones never enter the vocabulary: a word is left out when its espeak-ng phonemes are
within one edit of a keyword's, or when its spelling or phonemes start with a keyword of three or
more phonemes ("stopping", "houses").
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgemeta.audio import decode_wav, encode_wav, resample
from edgemeta.errors import EdgemetaError

WORD_LIST = "/usr/share/dict/words"
TEST_KEYWORDS = ("bed", "bird", "cat", "dog", "down", "eight", "five", "four", "go", "happy", "house", "left",
                 "marvin", "nine", "no", "off", "on", "one", "right", "seven", "sheila", "six", "stop", "three",
                 "tree", "two", "up", "wow", "yes", "zero")
RATE = 16000
CLIP = RATE  # one second, as Speech Commands
ACCENTS = ("en-us", "en", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-rp", "en-gb-x-gbcwmd", "en-029", "en-us-nyc")
# Rates are slow for TTS: a word said on its own, as to a keyword recogniser, lasts 0.4-0.8 s, twice
# what an engine takes for it inside a sentence.
# espeak-ng's voice variants that sound like people (robots, whispers and effects left out)
VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8", "f1", "f2", "f3", "f4", "f5", "klatt", "klatt2",
            "klatt3", "klatt4", "adam", "Alex", "Alicia", "Andrea", "Andy", "Annie", "aunty", "belinda", "benjamin",
            "boris", "caleb", "david", "ed", "edward", "Gene", "gustave", "iven", "john", "Lee", "linda", "max",
            "Michael", "Mike", "paul", "pedro", "quincy", "rob", "robert", "steph", "travis", "victor", "zac",
            "anika", "grandpa", "grandma", "shelby", "norbert", "sandro", "croak")
FLITE_VOICES = ("kal", "kal16", "awb", "rms", "slt")
FORMAT = 1  # bumped when the same seed would give other audio


@dataclass(frozen=True)
class SpeechPlan:
    words: int = 2000         # vocabulary size (classes)
    clips: int = 16           # clips per word
    seed: int = 0
    min_letters: int = 3
    max_letters: int = 8      # Speech Commands words are one or two syllables; long words overrun one second


def engines() -> dict[str, str | None]:
    return {name: shutil.which(name) for name in ("espeak-ng", "flite")}


def need_engines() -> None:
    missing = [n for n, p in engines().items() if p is None]
    if missing:
        raise EdgemetaError(f"speech synthesis needs {' and '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} "
                            f"not installed; on Debian/Ubuntu: apt-get install espeak-ng flite wamerican")


def read_words(path: str | Path = WORD_LIST, plan: SpeechPlan = SpeechPlan()) -> list[str]:
    """Lower-case alphabetic words of the list (no proper nouns, no possessives), sorted, unique."""
    p = Path(path)
    if not p.is_file():
        raise EdgemetaError(f"word list {p} does not exist; on Debian/Ubuntu: apt-get install wamerican, or pass --words-file")
    pattern = re.compile(f"[a-z]{{{plan.min_letters},{plan.max_letters}}}")
    return sorted({w for w in p.read_text(errors="replace").split() if pattern.fullmatch(w)})


def phonemes(words: list[str]) -> list[str]:
    """espeak-ng's phonemes of each word (stress and syllable marks removed), in order."""
    out = subprocess.run(["espeak-ng", "-q", "-x", "-v", "en-us", "--stdin"], input="\n\n".join(words) + "\n",
                         capture_output=True, text=True, check=True).stdout
    lines = [re.sub(r"[',_:%=-]", "", line).strip() for line in out.splitlines() if line.strip()]
    if len(lines) != len(words):  # a blank line ends a paragraph, so this does not happen with plain words
        raise EdgemetaError(f"espeak-ng gave {len(lines)} phoneme lines for {len(words)} words")
    return lines


def _edit_distance(a: str, b: str) -> int:
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def excluded(words: list[str], sounds: list[str], keywords: tuple[str, ...] = TEST_KEYWORDS) -> set[str]:
    """The words that are, or sound nearly like, a test keyword (see the module docstring)."""
    key_sounds = dict(zip(keywords, phonemes(list(keywords)), strict=True))
    out = set()
    for w, s in zip(words, sounds, strict=True):
        for k, ks in key_sounds.items():
            long_key = len(ks) >= 3
            if (w == k or (abs(len(s) - len(ks)) <= 1 and _edit_distance(s, ks) <= 1)
                    or (long_key and (w.startswith(k) or s.startswith(ks)))):
                out.add(w)
                break
    return out


def vocabulary(plan: SpeechPlan, words_file: str | Path = WORD_LIST) -> tuple[list[str], list[str]]:
    """(the plan's words, drawn with its seed from the list less the excluded ones, sorted; the excluded)."""
    words = read_words(words_file, plan)
    out = excluded(words, phonemes(words))
    allowed = [w for w in words if w not in out]
    if len(allowed) < plan.words:
        raise EdgemetaError(f"the word list has {len(allowed)} usable words, fewer than the {plan.words} asked for")
    chosen = np.random.default_rng([plan.seed, FORMAT]).choice(len(allowed), plan.words, replace=False)
    return sorted(allowed[i] for i in chosen), sorted(out)


# --- one clip ---------------------------------------------------------------------------------


def _tts(word: str, rng: np.random.Generator, tmp: Path) -> np.ndarray:
    """The word spoken by a random engine, voice, rate and pitch, as 16 kHz float samples."""
    out = tmp / "tts.wav"
    if rng.random() < 0.7:
        voice = f"{ACCENTS[rng.integers(len(ACCENTS))]}+{VARIANTS[rng.integers(len(VARIANTS))]}"
        cmd = ["espeak-ng", "-v", voice, "-s", str(int(rng.integers(80, 171))), "-p", str(int(rng.integers(20, 81))),
               "-w", str(out), word]
    else:
        cmd = ["flite", "-voice", FLITE_VOICES[rng.integers(len(FLITE_VOICES))],
               "--setf", f"duration_stretch={rng.uniform(1.0, 1.6):.3f}",
               "--setf", f"int_f0_target_mean={rng.uniform(85, 220):.1f}", "-t", word, "-o", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=60)
    samples, rate = decode_wav(out.read_bytes(), str(out))
    return resample(samples, rate, RATE)


def _trim(x: np.ndarray, floor_db: float = -45.0) -> np.ndarray:
    """The word without the engine's leading and trailing silence."""
    loud = np.flatnonzero(np.abs(x) > np.abs(x).max() * 10 ** (floor_db / 20))
    return x[loud[0]:loud[-1] + 1] if loud.size else x


def _band(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random microphone: high-pass 40-300 Hz, low-pass 3.4-8 kHz, gentle tilt (FFT mask)."""
    spec = np.fft.rfft(x)
    f = np.fft.rfftfreq(x.size, 1 / RATE)
    lo, hi = rng.uniform(40, 300), rng.uniform(3400, 8000)
    gain = 1 / np.sqrt(1 + (lo / np.maximum(f, 1)) ** 4) / np.sqrt(1 + (f / hi) ** 8)
    gain *= (np.maximum(f, 100) / 1000) ** rng.uniform(-0.3, 0.3)
    return np.fft.irfft(spec * gain, x.size)


def _reverb(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A small room: exponentially decaying noise (RT60 0.1-0.7 s) after the direct sound."""
    rt60 = rng.uniform(0.1, 0.7)
    n = int(rt60 * RATE)
    t = np.arange(n) / RATE
    ir = rng.standard_normal(n) * np.exp(-6.9 * t / rt60) * rng.uniform(0.05, 0.4)
    ir[0] = 1.0
    wet = np.fft.irfft(np.fft.rfft(x, x.size + n) * np.fft.rfft(ir, x.size + n), x.size + n)[:x.size]
    return wet


def _noise(n: int, rng: np.random.Generator) -> np.ndarray:
    """White, pink or brown noise of unit RMS."""
    white = rng.standard_normal(n)
    colour = rng.integers(3)
    if colour:
        f = np.maximum(np.fft.rfftfreq(n, 1 / RATE), 20.0)
        white = np.fft.irfft(np.fft.rfft(white) / f ** (0.5 * colour), n)
    return white / (np.sqrt(np.mean(white ** 2)) + 1e-12)


def make_clip(word: str, seed: int, word_index: int, clip_index: int, tmp: Path) -> np.ndarray:
    """One second of 16 kHz audio of `word`, drawn from its own generator."""
    rng = np.random.default_rng([seed, FORMAT, word_index, clip_index])
    x = _trim(_tts(word, rng, tmp))
    x = resample(x, RATE, max(1, round(x.size / rng.uniform(0.9, 1.1))))  # speed and pitch perturbation
    if x.size > 0.95 * CLIP:  # a long word is sped up to fit the window
        x = resample(x, x.size, int(0.95 * CLIP))
    x = x / (np.abs(x).max() + 1e-9)
    clip = np.zeros(CLIP)
    start = int(rng.integers(0, CLIP - x.size + 1))
    clip[start:start + x.size] = x
    clip = _band(clip, rng)
    if rng.random() < 0.5:
        clip = _reverb(clip, rng)
    speech_rms = np.sqrt(np.mean(x ** 2))
    snr = rng.uniform(10, 45)  # always some: a real recording is never digital silence around the word
    clip = clip + _noise(CLIP, rng) * speech_rms * 10 ** (-snr / 20)
    level = 10 ** (rng.uniform(-30, -1) / 20)
    return clip / (np.abs(clip).max() + 1e-9) * level


def _word_folder(args: tuple[str, int, int, int, str]) -> str:
    """All clips of one word into out/<word>/, written to a temporary folder and renamed (a killed run
    leaves no half word; a rerun skips the finished ones)."""
    word, index, clips, seed, out = args
    dest = Path(out) / word
    if dest.is_dir():
        return word
    with tempfile.TemporaryDirectory(dir=out, prefix=f".{word}.") as tmp:
        t = Path(tmp)
        work = t / word
        work.mkdir()
        for c in range(clips):
            (work / f"{word}_{c:03d}.wav").write_bytes(encode_wav(make_clip(word, seed, index, c, t), RATE))
        os.replace(work, dest)
    return word


def generate(out: str | Path, plan: SpeechPlan, *, words_file: str | Path = WORD_LIST, jobs: int = 1,
             log=print) -> list[str]:
    """Write plan.words x plan.clips clips under out/<word>/ and a SOURCE.md saying how; returns the words."""
    need_engines()
    words, left_out = vocabulary(plan, words_file)
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    (root / "SOURCE.md").write_text(_source_note(plan, len(left_out)))
    (root / "excluded.txt").write_text("\n".join(left_out) + "\n")
    todo = [(w, i, plan.clips, plan.seed, str(root)) for i, w in enumerate(words)]
    done = 0
    with ProcessPoolExecutor(max_workers=max(1, jobs)) as pool:
        for _ in pool.map(_word_folder, todo, chunksize=4):
            done += 1
            if done % 100 == 0 or done == len(todo):
                log(f"{done}/{len(todo)} words")
    return words


def _source_note(plan: SpeechPlan, excluded_count: int) -> str:
    return f"""# Synthetic spoken words (edgemeta data speech)

Generated by `edgemeta data speech --words {plan.words} --clips {plan.clips} --seed {plan.seed}` (format {FORMAT}):
{plan.words} words of {plan.min_letters}-{plan.max_letters} letters from Debian's wamerican word list, {plan.clips} clips each,
one second of 16 kHz 16-bit mono, spoken by espeak-ng (accents {', '.join(ACCENTS)}; {len(VARIANTS)} voice
variants) or flite (voices {', '.join(FLITE_VOICES)}) at random rates and pitches, then speed-perturbed,
band-limited, reverberated and mixed with noise at 10-45 dB SNR (edgemeta/host/data/speech.py).
{excluded_count} words of the list were left out as the test keywords or their near homophones (excluded.txt).

Licences: the word list is SCOWL-derived (wamerican, Kevin Atkinson et al., a permissive licence, see
/usr/share/doc/wamerican/copyright); espeak-ng (GPL-3) and flite (BSD-like) are programs whose output
carries no licence of theirs. The clips are free to use.
"""
