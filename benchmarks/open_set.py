"""Open set on data the model never saw: how often a stranger is accepted as an enrolled class, with the
model's threshold and with the store's own (calibrated from the enrolled samples: runtime/heads/open_set.py).

Each seeded episode enrolls `--way` classes from `--shot` samples each, then asks `--query` other samples
of every enrolled class (known) and `--query` samples of each of `--way` classes never enrolled
(strangers); with negatives, `--negatives` further classes give `--negative-shots` "none of these"
samples each. The embeddings are the board's (the int8 variant through the runtime's interpreter); the
head and the calibration are the store's own numpy code. Datasets:

  omniglot-eval  the 659 characters of Omniglot's 20 evaluation alphabets (unseen by a lake-split model)
  speech         log-spectrogram images of the 30 words x 10 clips of ../shared/data/speech_commands_v0.01_subset
                 (sounds, not drawings: far from an Omniglot model's training data)

    python -m benchmarks.open_set --model models/omniglot-conv4 --data ../shared/data
"""

from __future__ import annotations

import argparse
import tempfile
import wave
from pathlib import Path

import numpy as np
from PIL import Image

from edgemeta.host.data import DatasetSpec, FewShotSplit, load_dataset  # (numpy + Pillow only)
from edgemeta.runtime.fewshot import FewShotRuntime
from edgemeta.runtime.heads.common import DISTANCES, prototypes
from edgemeta.runtime.heads.open_set import calibrate, domain_warning, leave_one_out


def spectrogram_png(wav: Path, out: Path, size: int = 64) -> None:
    """A one-second clip as a log-power spectrogram image (time across, frequency up), dark on light."""
    with wave.open(str(wav)) as w:
        x = np.frombuffer(w.readframes(w.getnframes()), np.int16).astype(np.float32) / 32768
    x = np.pad(x, (0, max(0, 16000 - len(x))))[:16000]
    frames = np.lib.stride_tricks.sliding_window_view(x, 400)[::160] * np.hanning(400)
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2
    bands = np.array_split(np.arange(power.shape[1]), size)
    spec = np.log(np.stack([power[:, b].mean(axis=1) for b in bands], axis=1) + 1e-8).T[::-1]
    spec = (spec - spec.min()) / max(spec.max() - spec.min(), 1e-6)
    img = Image.fromarray((255 * (1 - spec)).astype(np.uint8)).resize((size, size), Image.BILINEAR)
    img.save(out)


def speech_folder(src: Path, dst: Path) -> Path:
    for word in sorted(d for d in src.iterdir() if d.is_dir()):
        (dst / word.name).mkdir(parents=True, exist_ok=True)
        for clip in sorted(word.glob("*.wav")):
            spectrogram_png(clip, dst / word.name / f"{clip.stem}.png")
    return dst


def run(split: FewShotSplit, emb: np.ndarray, sup: np.ndarray, rt: FewShotRuntime, args) -> dict[str, dict]:
    distance = rt.manifest.distance
    index = split.class_indices()
    rng_rows = {name: {"known": [], "correct": [], "stranger": [], "expected": []} for name in ROWS}
    warned = 0
    reference = rt.variant.open_set_stranger_median or rt.threshold_of_model
    for e in range(args.episodes):
        rng = np.random.default_rng((args.seed, e))
        classes = rng.choice(split.num_classes, 2 * args.way + args.negatives, replace=False)
        enrolled, strangers, negative = classes[:args.way], classes[args.way:2 * args.way], classes[2 * args.way:]
        picks = [rng.choice(index[c], args.shot + args.query, replace=False) for c in enrolled]
        support = np.concatenate([p[:args.shot] for p in picks])
        labels = np.repeat(np.arange(args.way), args.shot)
        known = np.concatenate([p[args.shot:] for p in picks])
        known_labels = np.repeat(np.arange(args.way), args.query)
        stranger = np.concatenate([rng.choice(index[c], args.query, replace=False) for c in strangers])
        neg = np.concatenate([rng.choice(index[c], args.negative_shots, replace=False) for c in negative]) if args.negatives else []
        protos = prototypes(sup[support], labels, args.way)
        d_known = DISTANCES[distance](emb[known], protos)
        d_stranger = DISTANCES[distance](emb[stranger], protos).min(axis=1)
        qs = emb[support] if rt.support_shift else None  # the one-view embeddings the store keeps beside the views'
        _, proxies = leave_one_out(sup[support], labels, args.way, distance, queries=qs)
        warned += domain_warning(float(np.median(proxies)), reference) is not None
        settings = {
            "model's threshold (export, validation classes)": (rt.threshold_of_model, None),
            "store, --accept 0.95": calibrate(sup[support], labels, args.way, distance, accept=0.95, queries=qs),
            "store, --false-accept 0.05": calibrate(sup[support], labels, args.way, distance, accept=None, false_accept=0.05,
                                                    queries=qs),
            f"store, --false-accept 0.05, {args.negatives}x{args.negative_shots} negatives":
                calibrate(sup[support], labels, args.way, distance, emb[neg] if len(neg) else None, accept=None,
                          false_accept=0.05, queries=qs),
        }
        for name, s in settings.items():
            t, expected = s if isinstance(s, tuple) else (s["threshold"], s["false_accept"])
            accepted = d_known.min(axis=1) <= t
            r = rng_rows[name]
            r["known"].append(accepted.mean())
            r["correct"].append((accepted & (d_known.argmin(axis=1) == known_labels)).mean())
            r["stranger"].append((d_stranger <= t).mean())
            if expected is not None:
                r["expected"].append(expected)
    out = {}
    for name, r in rng_rows.items():
        out[name] = {k: (100 * float(np.mean(v)), 196 * float(np.std(v, ddof=1)) / np.sqrt(len(v))) if v else None
                     for k, v in r.items()}
    out["_warned"] = 100 * warned / args.episodes
    return out


ROWS = ["model's threshold (export, validation classes)", "store, --accept 0.95", "store, --false-accept 0.05"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/omniglot-conv4")
    ap.add_argument("--data", default="../shared/data", help="Folder holding omniglot/ and speech_commands_v0.01_subset/.")
    ap.add_argument("--datasets", default="omniglot-eval,speech")
    ap.add_argument("--way", type=int, default=10)
    ap.add_argument("--shot", type=int, default=5)
    ap.add_argument("--query", type=int, default=5)
    ap.add_argument("--negatives", type=int, default=5, help="Classes giving negative samples.")
    ap.add_argument("--negative-shots", type=int, default=2)
    ap.add_argument("--episodes", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    ROWS.append(f"store, --false-accept 0.05, {args.negatives}x{args.negative_shots} negatives")
    rt = FewShotRuntime(args.model)
    pre = rt.manifest.preprocess
    data = Path(args.data)
    print(f"model {args.model} ({rt.variant.name}, {rt.embedder.runtime}); {args.episodes} seeded episodes of {args.way} enrolled "
          f"classes x {args.shot} shots, {args.query} queries per enrolled class and per each of {args.way} strangers' classes")
    print("| data | unknown test | known accepted (%) | known accepted and right (%) | strangers accepted (%) | "
          "expected strangers accepted (%) |")
    print("|---|---|---|---|---|---|")
    for name in args.datasets.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            if name == "omniglot-eval":
                split = load_dataset(DatasetSpec(root=str(data / "omniglot"), split="lake"), pre, ("test",))["test"]
            else:
                folder = speech_folder(data / "speech_commands_v0.01_subset", Path(tmp) / "speech")
                split = load_dataset(DatasetSpec(kind="folder", root=str(folder), fractions=(0, 0, 1)), pre, ("test",))["test"]
            # enrolled samples as the store holds them (the mean over the head's support views, if it has them)
            # and as queries (one view): one pass of each
            pairs = [rt.embed_support(split.images[i:i + 256]) for i in range(0, len(split.images), 256)]
            sup = np.concatenate([p[0] for p in pairs])
            emb = sup if not rt.support_shift else np.concatenate([p[1] for p in pairs])
        res = run(split, emb, sup, rt, args)
        for row in ROWS:
            r = res[row]

            def cell(v):
                return "-" if v is None else f"{v[0]:.1f} +/- {v[1]:.1f}"

            print(f"| {name} ({split.num_classes} classes) | {row} | {cell(r['known'])} | {cell(r['correct'])} | "
                  f"{cell(r['stranger'])} | {cell(r['expected'])} |")
        print(f"| {name} | episodes whose store warned 'unlike the model's training data' | {res['_warned']:.0f}% | | | |")


if __name__ == "__main__":
    main()
