"""A head kind that edgemeta does not ship, for tests/test_head_registry.py: the nearest enrolled sample
(1-NN) instead of the nearest prototype, its ranking sharpened by a temperature kept in a file of its own
beside the manifest. It is this one file and its registration: nothing in edgemeta names it.

Manifest section: ``{"kind": "nearest_sample", "distance", "file": "nearest_sample.json", "sha256"}``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgemeta.atomic import write_atomic
from edgemeta.errors import EdgemetaError
from edgemeta.files import sha256_file
from edgemeta.runtime.heads import ExportContext, Head, ModelFacts, register
from edgemeta.runtime.heads.common import DISTANCES, PrototypeHead, answers, store_prototypes

FILE = "nearest_sample.json"


def nearest_per_class(distance: str, support: np.ndarray, labels: np.ndarray, queries: np.ndarray, way: int) -> np.ndarray:
    """(queries, way): each query's distance to the nearest enrolled sample of each class."""
    d = DISTANCES[distance](queries.astype(np.float32), support.astype(np.float32))
    return np.stack([d[:, labels == c].min(axis=1) for c in range(way)], axis=1)


class NearestSampleClassifier:
    """A store's classes ranked by their nearest sample; the prototypes decide "unknown", as in every kind."""

    def __init__(self, protos: PrototypeHead, embeddings: np.ndarray, labels: np.ndarray, temperature: float):
        self.protos, self.embeddings, self.labels, self.temperature = protos, embeddings, labels, temperature

    @property
    def names(self) -> list[str]:
        return self.protos.names

    def classify(self, queries: np.ndarray, top_k: int = 1, unknown: str = "unknown") -> list[dict]:
        cost = nearest_per_class(self.protos.distance, self.embeddings, self.labels, queries, len(self.names))
        return answers(self.names, cost / self.temperature, self.protos.distances(queries), self.protos.threshold,
                       top_k, unknown)


@register
@dataclass(frozen=True)
class NearestSample(Head):
    kind = "nearest_sample"

    distance: str
    temperature: float = 1.0
    file: str = FILE
    sha256: str | None = None

    @classmethod
    def read(cls, section, facts: ModelFacts) -> NearestSample:
        name, sha = section.file_name("file"), section.get("sha256", str)
        path = facts.path.parent / name
        if not path.is_file() or sha256_file(path) != sha:
            raise EdgemetaError(f"{path} is missing or does not match its manifest checksum; re-export the model")
        temperature = json.loads(path.read_text())["temperature"]
        return cls(facts.distance, float(temperature), name, sha)

    def to_manifest(self) -> dict:
        return {"kind": self.kind, "distance": self.distance}

    def write(self, out: Path, ctx: ExportContext | None) -> dict:
        write_atomic(out / self.file, json.dumps({"temperature": self.temperature}).encode())
        return {"file": self.file, "sha256": sha256_file(out / self.file)}

    def files(self, folder: Path, variant, verify: bool = True) -> list[Path]:
        return [folder / self.file]

    def build(self, store, threshold: float | None) -> NearestSampleClassifier:
        return NearestSampleClassifier(store_prototypes(store, self.distance, threshold), store.embeddings, store.labels,
                                       self.temperature)

    def describe(self, store) -> dict:
        return {"kind": self.kind, "temperature": self.temperature}

    @staticmethod
    def text(d: dict) -> str:
        return f"nearest enrolled sample, temperature {d['temperature']:g}"

    def scores(self, support: np.ndarray, labels: np.ndarray, queries: np.ndarray, way: int) -> np.ndarray:
        return -nearest_per_class(self.distance, support, labels, queries, way) / self.temperature

    def description(self) -> str:
        return "nearest enrolled sample"
