"""The README's main job: enroll unseen characters from one drawing each, classify the rest
(`--audio`: keywords from a few real recordings each).

Runs on the board runtime alone (numpy + interpreter): each episode picks `way` classes of the
sample folder (characters, or spoken words for a keyword model), enrolls `shot` samples of each into
a fresh enrollment store on disk, and classifies every other sample of those classes through the
store, timing each stage.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from edgemeta.errors import EdgemetaError
from edgemeta.stats import mean_ci95


def run_demo(model: str, samples: str, way: int = 20, shot: int = 1, episodes: int = 10, seed: int = 0,
             variant: str | None = None, threads: int = 1, log=print) -> dict:
    from edgemeta.runtime.fewshot import FewShotRuntime

    root = Path(samples)
    if not root.is_dir():
        raise EdgemetaError(f"sample folder {root} does not exist")
    t0 = time.perf_counter()
    rt = FewShotRuntime(model, variant=variant, threads=threads)
    load_s = time.perf_counter() - t0
    pre = rt.manifest.preprocess
    sound = pre.kind == "audio"
    what, sample = ("keywords", "recording") if sound else ("characters", "drawing")
    classes = {d.name: sorted(f for f in d.iterdir() if f.suffix.lower() in pre.suffixes)
               for d in sorted(root.iterdir()) if d.is_dir()}
    classes = {k: v for k, v in classes.items() if len(v) > shot}
    if len(classes) < way:
        raise EdgemetaError(f"{root} has {len(classes)} classes with more than {shot} {sample}(s) for this "
                            f"{'keyword' if sound else 'image'} model; the demo needs {way}")
    log(f"model {rt.manifest.name} ({rt.variant.name}, {rt.embedder.runtime}) loaded in {1000 * load_s:.0f} ms")
    names = list(classes)
    accs, known, enroll_ms, classify_ms, n_queries = [], [], [], [], 0
    with tempfile.TemporaryDirectory() as tmp:
        for ep in range(episodes):
            rng = np.random.default_rng((seed, ep))
            chosen = [names[i] for i in rng.choice(len(names), way, replace=False)]
            store = Path(tmp) / f"store{ep}"
            queries, truth = [], []
            for c in chosen:
                files = [classes[c][i] for i in rng.permutation(len(classes[c]))]
                t = time.perf_counter()
                rt.enroll(store, c, files[:shot])
                enroll_ms.append(1000 * (time.perf_counter() - t))
                queries += files[shot:]
                truth += [c] * (len(files) - shot)
            t = time.perf_counter()
            results = rt.classify(store, queries)
            classify_ms.append(1000 * (time.perf_counter() - t) / len(queries))
            n_queries += len(queries)
            # accuracy of the nearest prototype; "unknown" answers are counted separately
            accs.append(np.mean([r["top"][0]["label"] == c for r, c in zip(results, truth, strict=True)]))
            known.append(np.mean([r["known"] for r in results]))
            log(f"episode {ep + 1}/{episodes}: {way} {what} enrolled from {shot} {sample}(s) each, "
                f"{len(queries)} {sample}s classified, accuracy {100 * accs[-1]:.1f}%")
    acc, ci = mean_ci95(np.array(accs))
    summary = {"model": rt.manifest.name, "variant": rt.variant.name, "runtime": rt.embedder.runtime, "way": way, "shot": shot,
               "episodes": episodes, "queries": n_queries, "accuracy": 100 * acc, "ci95": 100 * ci if episodes > 1 else None,
               "answered_known": 100 * float(np.mean(known)), "model_load_ms": 1000 * load_s,
               "enroll_ms_per_class": float(np.median(enroll_ms)), "classify_ms_per_image": float(np.median(classify_ms)),
               "classes": len(names), "input": pre.kind, "samples": str(root),
               "alphabets": None if sound else len({n.rsplit("_character", 1)[0] for n in names}),
               # the export's figures of a keyword model are on synthetic test words, not these real voices
               "reference": None if sound else _reference(rt, way, shot)}
    return summary


def _reference(rt, way: int, shot: int) -> dict | None:
    """The export's figure for this setting and variant (its 1000 test episodes over the whole test split), if any."""
    for r in rt.manifest.raw.get("variants", {}).get(rt.variant.name, {}).get("evaluation", []):
        if isinstance(r, dict) and r.get("setting") == f"{way}w{shot}s" and r.get("episodes"):
            return {"accuracy": r.get("accuracy"), "ci95": r.get("ci95"), "episodes": r.get("episodes"),
                    "protocol": rt.manifest.raw.get("evaluation", {}).get("protocol", "")}
    return None
