"""Few-shot keyword spotting on real human voices, side by side on the same seeded episodes.

The keyword model (meta-trained on synthetic speech only) on the 30 Speech Commands words of
../shared/data/speech_commands_v0.01_subset (41 speakers, 10 clips per word; never used in training
or to choose anything), as the host runs it (Keras float32) and as the board runs it (int8_static
through the TFLite interpreter), against the two baselines a user would otherwise build on a board:

- MFCC + dynamic time warping template matching: 13 MFCCs per frame (DCT-II of the same log-mel),
  a query's distance to a class is its smallest DTW cost to one of the class's enrolled clips
  (cost normalised by the two lengths), the classic on-device enrollment;
- MFCC mean + nearest prototype: each clip's MFCCs averaged over time, classes by their mean.

Each setting draws the same 1000 seeded episodes for all four (episodes index clips, so every
method sees the same support and query clips), 5 queries per class (10 clips: shot + query <= 10).
Also the model on its synthetic test words (held-out TTS words) to show the synthetic-to-real gap.
Batch norm: the running statistics (not transductive), as on the board.

    python -m benchmarks.keywords --model models/keywords-conv4 --episodes 1000
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

SPEECH = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "speech_commands_v0.01_subset"
SETTINGS = ((5, 1), (5, 5), (10, 1), (10, 5), (20, 1), (20, 5))
N_MFCC = 13


def mfcc(db: np.ndarray, n: int = N_MFCC) -> np.ndarray:
    """(frames, mels) dB -> (frames, n) MFCCs by an orthonormal DCT-II over the mel axis."""
    m = db.shape[1]
    k = np.arange(n)[:, None]
    basis = np.cos(np.pi * k * (2 * np.arange(m)[None, :] + 1) / (2 * m)) * np.sqrt(2 / m)
    basis[0] /= np.sqrt(2)
    return db @ basis.T


def real_clips(pre):
    """The real keyword clips as a FewShotSplit (model inputs) and their MFCC sequences."""
    from edgemeta.audio import decode_wav, log_mel_db, loudest_window, resample
    from edgemeta.host.data import FewShotSplit
    from edgemeta.host.data.dataset import load_folder

    images, labels, names = load_folder(str(SPEECH), pre)
    seqs = []
    for word in names:
        for f in sorted((SPEECH / word).glob("*.wav")):
            x, rate = decode_wav(f.read_bytes(), str(f))
            seqs.append(mfcc(log_mel_db(loudest_window(resample(x, rate, pre.sample_rate), pre.clip_length, pre.hop_length), pre)))
    return FewShotSplit("real", images, labels, names), np.stack(seqs).astype(np.float32)


def dtw_matrix(seqs: np.ndarray, chunk: int = 10) -> np.ndarray:
    """(n, n) normalised DTW costs between every pair of MFCC sequences (Euclidean frame distance)."""
    n, t, _ = seqs.shape
    out = np.empty((n, n), np.float32)
    for a in range(0, n, chunk):
        q = seqs[a:a + chunk]
        cost = np.linalg.norm(q[:, None, :, None, :] - seqs[None, :, None, :, :], axis=-1)  # (c, n, t, t)
        d = np.full((q.shape[0], n, t + 1, t + 1), np.inf, np.float32)
        d[:, :, 0, 0] = 0
        for i in range(1, t + 1):
            for j in range(1, t + 1):
                d[:, :, i, j] = cost[:, :, i - 1, j - 1] + np.minimum(np.minimum(d[:, :, i - 1, j], d[:, :, i, j - 1]),
                                                                      d[:, :, i - 1, j - 1])
        out[a:a + chunk] = d[:, :, t, t] / (2 * t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="models/keywords-conv4")
    ap.add_argument("--episodes", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default="", help="Also write the figures here.")
    args = ap.parse_args()

    from edgemeta.host.evaluate import evaluate
    from edgemeta.host.methods import get_method
    from edgemeta.host.model_eval import keras_embedder, model_splits, training_dataset
    from edgemeta.host.modeldir import load_backbone
    from edgemeta.runtime.interpreter import Embedder

    model, info = load_backbone(args.model)
    pre = info.preprocess
    split, seqs = real_clips(pre)
    proto = get_method("protonet").classify
    t0 = time.perf_counter()
    dtw = dtw_matrix(seqs)
    dtw_s = time.perf_counter() - t0

    def dtw_classify(support, labels, queries, way):
        d = dtw[queries[:, 0].astype(int)][:, support[:, 0].astype(int)]
        return -np.stack([d[:, labels == c].min(axis=1) for c in range(way)], axis=1)

    host = keras_embedder(model)
    board = Embedder(Path(args.model) / "int8_static.tflite")
    columns = {
        "board int8 (model)": (board(split.images), proto),
        "host float32 (model)": (host(split.images), proto),
        "MFCC + DTW templates": (np.arange(len(split.images), dtype=np.float32)[:, None], dtw_classify),
        "MFCC mean, nearest prototype": (seqs.mean(axis=1), proto),
    }
    table = {}
    for name, (emb, classify) in columns.items():
        table[name] = evaluate(None, classify, split, SETTINGS, args.episodes, query=5, seed=args.seed, embeddings=emb)
    synth = model_splits(args.model, info, training_dataset(info), ("test",))[0]["test"]
    synthetic = {"board int8 (model)": evaluate(None, proto, synth, SETTINGS, args.episodes, query=5, seed=args.seed,
                                                embeddings=board(synth.images)),
                 "host float32 (model)": evaluate(None, proto, synth, SETTINGS, args.episodes, query=5, seed=args.seed,
                                                  embeddings=host(synth.images))}

    head = "| | " + " | ".join(f"{w}w{s}s" for w, s in SETTINGS) + " |"
    print(f"real voices: {split.num_classes} Speech Commands words x 10 clips, {args.episodes} seeded episodes "
          f"(seed {args.seed}), 5 queries per class, mean accuracy % +/- 95% CI")
    print(head + "\n|---" * 1 + "|---" * len(SETTINGS) + "|")
    for name, res in table.items():
        print(f"| {name} | " + " | ".join(f"{r.accuracy:.2f} +/- {r.ci95:.2f}" for r in res) + " |")
    print(f"\nsynthetic test words ({synth.num_classes} held-out TTS words, the same protocol)")
    for name, res in synthetic.items():
        print(f"| {name} | " + " | ".join(f"{r.accuracy:.2f} +/- {r.ci95:.2f}" for r in res) + " |")
    print(f"\nDTW matrix of {len(seqs)} clips: {dtw_s:.1f} s ({dtw_s / len(seqs) ** 2 * 1e3:.3f} ms per pair)")
    if args.json:
        Path(args.json).write_text(json.dumps({k: [vars(r) for r in v] for k, v in {**table, **{
            f"synthetic {k}": v for k, v in synthetic.items()}}.items()}, indent=1, default=str))


if __name__ == "__main__":
    main()
