"""The run folder a training writes (its layout: host/modeldir.py): the configuration, the model and
the method's arrays, the summary (model.json), the learning curve, the class split, and what the
model holds after a run, in words."""

from __future__ import annotations

import csv
import io
import os
import platform
from dataclasses import dataclass
from pathlib import Path

import tensorflow as tf

from edgemeta.errors import EdgemetaError
from edgemeta.host.config import Config, dump_toml, load_config
from edgemeta.host.data.dataset import _folder_files, _suffixes  # the class folders, listed as the loader lists them
from edgemeta.host.modeldir import (
    INFO_FILE,
    METHOD_FILE,
    MODEL_FILE,
    SPLITS_FILE,
    ModelInfo,
    read_info,
    write_atomic,
    write_json,
    write_npz,
)

HISTORY_FIELDS = ("episode", "loss", "train_acc", "val_acc", "val_ci95", "learning_rate", "elapsed_s")


@dataclass
class TrainResult:
    episodes: int
    best_val_acc: float
    best_val_ci95: float
    best_episode: int
    elapsed_s: float
    stopped_by: str
    chief: bool = True   # False on the other workers of a cluster, which write no model folder
    model_note: str = ""  # what the folder's model.keras holds after this run (or why there is none yet)


def model_note(out: Path, state: dict, stopped_by: str, every: int, episodes: int, classes: str, replicas: int) -> str:
    """What model.keras holds after a run, in words (or why there is none yet)."""
    history = state["history"]
    if state["best_val_acc"] < 0 or not history:
        checkpoint = state.get("checkpoint")
        return ("no model.keras yet: no validation ran" + (
            f"; run the same command again to resume from the checkpoint at episode {checkpoint['episode']}"
            if checkpoint else ""))
    path, best = out / MODEL_FILE, state["best_episode"]
    if classes == "trainval":
        return f"model in {path}: the last validated weights (episode {best}; trainval keeps the last)"
    last = history[-1]["episode"]
    if len(history) == 1 and stopped_by in ("time budget", "interrupted") and last % every >= replicas and last < episodes:
        why = "the time budget ended" if stopped_by == "time budget" else "the run was interrupted"
        return (f"model in {path}: the last weights (episode {last}), validated once, at the stop: {why} before the "
                f"first scheduled validation (episode {min(every, episodes)})")
    return f"model in {path}: the best validated weights (episode {best}" + (", the last)" if best == last else ")")


def split_record(cfg: Config, splits: dict) -> dict | None:
    """A folder dataset's class split, as splits.json records it (None for Omniglot, whose splits are named)."""
    if cfg.data.kind != "folder":
        return None
    files = _folder_files(Path(cfg.data.root).expanduser(), _suffixes(cfg.preprocess))
    named = {"train": splits["train"].class_names, "val": splits["val"].class_names}
    held = {n for names in named.values() for n in names}
    named["test"] = [n for n in files if n not in held]
    return {"format": 1, "kind": "folder", "root": cfg.data.root, "fractions": list(cfg.data.fractions),
            "seed": cfg.data.seed,
            "how": "the sorted class folders, permuted with [data] seed and cut by [data] fractions; "
                   "edgemeta eval and export use these lists",
            "classes": named, "images": {k: sum(len(files[n]) for n in v) for k, v in named.items()}}


def check_same_split(old: dict | None, new: dict, out: Path) -> None:
    """A resumed run must train on the classes it started with: a class folder added, removed or renamed
    can reshuffle the seeded split, and the checkpoint may then have seen classes that are now held out."""
    if old is None or old.get("classes") == new["classes"]:
        return
    moved = sorted({n for k in ("train", "val", "test") for n in set(old["classes"].get(k, [])) ^ set(new["classes"][k])})
    if not moved:
        return
    raise EdgemetaError(f"the classes of {new['root']} are no longer split as when the run in {out} started "
                        f"({len(moved)} class(es) changed split, e.g. {moved[0]!r}; {out / SPLITS_FILE} has the old "
                        "split): restore the folder (or [data] fractions and seed), or start over with --fresh")


def _init_training(source: str) -> dict:
    """The training summary of the model a run started from, so the total cost stays on record."""
    path = Path(source)
    folder = path if path.is_dir() else path.parent
    if not (folder / INFO_FILE).is_file():
        return {}
    t = read_info(folder).training
    return {k: t[k] for k in ("episodes", "wall_time_s", "best_val_acc", "classes", "init_training") if k in t}


def write_config(cfg: Config, path: Path) -> None:
    """Record the resolved configuration, keeping an existing file (and its comments) that says the same."""
    try:
        if path.exists() and load_config(path) == cfg:
            return
    except Exception:  # an unreadable old file is simply replaced
        pass
    write_atomic(path, dump_toml(cfg))


def save_model(model, method, out: Path) -> None:
    tmp = out / f".tmp-{MODEL_FILE}"  # Keras insists on the .keras suffix
    model.save(tmp)
    arrays = method.head_arrays()
    if arrays:  # the method's own variables (head initialisation, learned rates) beside the backbone
        write_npz(out / METHOD_FILE, arrays)
    tmp.replace(out / MODEL_FILE)


def machine_description() -> str:
    """CPU model, cores, OS, architecture and Python: where a figure was measured."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}, Python {platform.python_version()}"


def write_summary(cfg: Config, out: Path, model, method, result: TrainResult, history: list[dict], replicas: int,
                   sizes: dict, placement: dict | None = None, episodes_per_s: float | None = None) -> None:
    info = ModelInfo(
        backbone=cfg.model.backbone, algorithm=cfg.method.name, distance=method.distance,
        method=cfg.method.to_dict(),
        preprocess=cfg.preprocess, embedding_dim=int(model.output_shape[-1]),
        # what it was trained on: a folder dataset is found again by its path and seeded split (Omniglot by
        # --data / $EDGEMETA_OMNIGLOT and its split); each kind records only its own fields
        data={"kind": cfg.data.kind, **({"split": cfg.data.split, "rotations": cfg.data.rotations} if cfg.data.kind == "omniglot"
                                        else {"root": cfg.data.root, "fractions": list(cfg.data.fractions), "seed": cfg.data.seed}),
              **sizes},
        training={"episodes": result.episodes, "episodes_per_step": replicas, "meta_batch": cfg.train.meta_batch,
                  "best_episode": result.best_episode,
                  "best_val_acc": round(100 * result.best_val_acc, 2), "best_val_ci95": round(100 * result.best_val_ci95, 2),
                  "validation": f"{cfg.validation.episodes} episodes {cfg.validation.way}-way {cfg.validation.shot}-shot "
                                f"{cfg.validation.query}-query on the val split"
                                + (" (trained on too: not held out; last weights kept)" if cfg.train.classes == "trainval" else ""),
                  "classes": cfg.train.classes,
                  "wall_time_s": round(result.elapsed_s, 1), "stopped_by": result.stopped_by,
                  **({"init_from": cfg.train.init_from, "init_training": _init_training(cfg.train.init_from)}
                     if cfg.train.init_from else {}),
                  "machine": machine_description(), "tensorflow": tf.__version__,
                  # where it ran (strategy, replicas, this process's devices, GPU names) and how fast the training
                  # steps of the last run went (validation and the first, compiling step left out)
                  **({"placement": placement} if placement else {}),
                  **({"episodes_per_s": episodes_per_s} if episodes_per_s else {})},
    )
    write_json(out / INFO_FILE, info.to_dict())
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=HISTORY_FIELDS)
    w.writeheader()
    w.writerows(history)
    write_atomic(out / "history.csv", buf.getvalue())
    plot_curve(history, out / "curve.png", title=f"{cfg.method.name} {cfg.model.backbone} ({cfg.data.kind} {cfg.data.split})")


def plot_curve(history: list[dict], path: Path, title: str) -> None:
    """Training loss and validation accuracy against episodes, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not history:
        return
    ep = [h["episode"] for h in history]
    fig, ax1 = plt.subplots(figsize=(7, 4), dpi=100)
    ax1.plot(ep, [h["loss"] for h in history], color="tab:blue", label="training loss")
    ax1.set_xlabel("episodes")
    ax1.set_ylabel("training loss", color="tab:blue")
    ax2 = ax1.twinx()
    ax2.errorbar(ep, [100 * h["val_acc"] for h in history], yerr=[100 * h["val_ci95"] for h in history],
                 color="tab:red", marker=".", capsize=2, label="validation accuracy")
    ax2.set_ylabel("validation accuracy (%)", color="tab:red")
    ax1.set_title(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    write_atomic(path, buf.getvalue())
