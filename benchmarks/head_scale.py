"""The board's head with many enrolled classes: classify time, memory, and the store's load and save.

    python -m benchmarks.head_scale [--model models/omniglot-conv4] [--classes 10,100,1000,10000] [--shots 5]

For each size, a store of `--shots` embeddings per class (the model's embedding size; values near
real embeddings of the sample characters, so distances look like real ones) is written with the
runtime's `EnrollmentStore`, and timed: `save()` (atomic write), `open()` (load), building the
prototype head from it, one query through the head (distances, top-5, open set), one PNG through
`FewShotRuntime.classify` (decode, embed, store load, head), and the head's and the store's bytes.
Runtime only (numpy + the interpreter), medians of repeated runs.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.runtime_latency import REPO, median_ms, query_file, sample_files


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(REPO / "models" / "omniglot-conv4"))
    ap.add_argument("--classes", default="10,100,1000,10000")
    ap.add_argument("--shots", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=20)
    a = ap.parse_args(argv)

    from edgemeta.runtime.fewshot import FewShotRuntime
    from edgemeta.runtime.heads.common import PrototypeHead
    from edgemeta.runtime.interpreter import runtime_version
    from edgemeta.runtime.store import EnrollmentStore

    rt = FewShotRuntime(a.model)
    images, _ = rt.images(sample_files(classes=10))
    real = rt.embedder(images)
    queries = [query_file()]
    query = rt.embedder(rt.images(queries)[0])
    rng = np.random.default_rng(0)
    print(f"# {rt.manifest.name}, {rt.variant.name}, {rt.embedder.runtime} {runtime_version(rt.embedder.runtime)}; "
          f"{a.shots} samples per class, {real.shape[1]}-d; medians of {a.repeat}")
    print("| classes | save ms | load ms | head build ms | head classify ms | classify 1 PNG (incl. load) ms | "
          "prototypes MB | store on disk MB |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in (int(x) for x in a.classes.split(",")):
            emb = (real[rng.integers(0, len(real), a.shots * n)]
                   + rng.normal(0, 0.05, (a.shots * n, real.shape[1]))).astype(np.float32)
            labels = np.repeat(np.arange(n), a.shots).astype(np.int32)
            folder = Path(tmp) / f"store{n}"
            store = EnrollmentStore.create(folder, rt.backbone, False, rt.manifest.preprocess.input_shape)
            store.class_names = [f"class{i:05d}" for i in range(n)]
            store.embeddings, store.labels = emb, labels
            if store.query_embeddings is not None:  # a support-view model's store keeps one-view embeddings too
                store.query_embeddings = emb
            repeat = max(3, a.repeat if n <= 1000 else a.repeat // 4)
            save = median_ms(store.save, repeat)
            load = median_ms(lambda f=folder: EnrollmentStore.open(f), repeat)
            build = median_ms(lambda e=emb, lb=labels, s=store: PrototypeHead.from_embeddings(e, lb, s.class_names).prototypes,
                              repeat)
            head = PrototypeHead.from_embeddings(emb, labels, store.class_names, threshold=rt.threshold_of_model)
            classify = median_ms(lambda h=head: h.classify(query, top_k=5), repeat)
            full = median_ms(lambda f=folder: rt.classify(f, queries, top_k=5), repeat)
            head_mb = head.prototypes.nbytes / 2**20  # the float32 prototype matrix a query is compared with
            disk_mb = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20
            row = {"classes": n, "save_ms": save, "load_ms": load, "build_ms": build, "classify_ms": classify,
                   "classify_png_ms": full, "head_mb": head_mb, "disk_mb": disk_mb}
            rows.append(row)
            print(f"| {n} | {save:.2f} | {load:.2f} | {build:.2f} | {classify:.3f} | {full:.2f} | {head_mb:.2f} | {disk_mb:.2f} |",
                  flush=True)
    return rows


if __name__ == "__main__":
    main()
