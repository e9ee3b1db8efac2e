"""Meta-training end to end on a small real dataset (the shipped Omniglot sample)."""

import json
import signal
import subprocess
import sys
import time

import pytest

from edgemeta.errors import EdgemetaError
from edgemeta.host.config import config_from_dict
from edgemeta.host.data.augment import random_affine
from edgemeta.host.training import EpisodicTrainer, train
from tests.support.builders import REPO, tiny_config

pytestmark = pytest.mark.tf  # trains with TensorFlow


@pytest.fixture(scope="module")
def trained(tmp_path_factory, sample_dir):
    out = tmp_path_factory.mktemp("model")
    result = train(tiny_config(sample_dir), out, progress=False)
    return out, result


def test_training_learns_and_writes_a_model_folder(trained):
    out, result = trained
    assert result.episodes == 60 and result.stopped_by == "episodes"
    # 5-way chance is 20%; 60 episodes on real characters get well past it
    assert result.best_val_acc > 0.5
    for name in ("model.keras", "model.json", "config.toml", "history.csv", "curve.png"):
        assert (out / name).is_file(), name
    assert list((out / "tensorboard").iterdir())
    info = json.loads((out / "model.json").read_text())
    assert info["embedding_dim"] == 64 and info["distance"] == "squared_euclidean"
    assert info["preprocess"] == {"image_size": 28, "channels": 1, "invert": True}
    assert info["training"]["episodes"] == 60 and "cores" in info["training"]["machine"]
    assert (out / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "history.csv").read_text().count("\n") == 3  # header + 2 validations


def test_resume_continues_from_the_checkpoint(tmp_path, sample_dir):
    first = train(tiny_config(sample_dir, episodes=30), tmp_path, progress=False)
    assert first.episodes == 30
    second = train(tiny_config(sample_dir, episodes=60), tmp_path, progress=False)
    assert second.episodes == 60
    history = json.loads((tmp_path / "checkpoints" / "state.json").read_text())["history"]
    assert [h["episode"] for h in history] == [30, 60]
    fresh = train(tiny_config(sample_dir, episodes=30), tmp_path, progress=False, fresh=True)
    assert fresh.episodes == 30


def test_time_budget_stops_training(tmp_path, sample_dir):
    # 3 s on the real clock (tests/test_training_budget.py has the budget's details on a fake one)
    result = train(tiny_config(sample_dir, episodes=100000, max_minutes=0.05), tmp_path, progress=False)
    assert result.stopped_by == "time budget" and 0 < result.episodes < 100000
    assert result.elapsed_s < 3 + 2  # the training steps stop at the budget (the validation then comes on top)
    assert (tmp_path / "model.keras").is_file()


def test_sigterm_checkpoints_and_the_next_run_resumes(tmp_path, sample_dir):
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[data]\nkind = "folder"\nroot = "{sample_dir}"\n[train]\nway = 5\nshot = 1\nquery = 3\n'
                   "episodes = 100000\n[validation]\nevery = 20\nepisodes = 20\nway = 5\n")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "edgemeta", "train", "--config", str(cfg), "--out", str(out), "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    state = out / "checkpoints" / "state.json"
    deadline = time.monotonic() + 120
    while not state.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert state.exists(), proc.communicate()[1]
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert "(interrupted)" in stdout
    stopped_at = json.loads(state.read_text())["history"][-1]["episode"]
    assert stopped_at >= 20
    again = subprocess.run(cmd + ["--episodes", str(stopped_at + 20)], capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert f"stopped after {stopped_at + 20} episodes (episodes)" in again.stdout


def test_mirrored_strategy_on_two_logical_cpus(tmp_path, sample_dir):
    """The same training code under MirroredStrategy: each replica takes its own episode."""
    script = f"""
import json
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from tests.support.builders import tiny_config
from edgemeta.host.training import train
cfg = tiny_config({str(sample_dir)!r}, episodes=40, devices=["/cpu:0", "/cpu:1"], augment_shift=0.1, augment_rotate=10.0)
r = train(cfg, {str(tmp_path)!r}, progress=False)
print(json.dumps({{"episodes": r.episodes, "acc": r.best_val_acc}}))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    info = json.loads((tmp_path / "model.json").read_text())
    assert result["episodes"] == 40 and info["training"]["episodes_per_step"] == 2
    assert result["acc"] > 0.3


def test_init_from_copies_the_weights_of_a_trained_model(trained, sample_dir, tmp_path):
    import keras
    import numpy as np

    from edgemeta.host.training.trainer import _load_initial_weights

    out, _ = trained
    source = keras.models.load_model(out / "model.keras", compile=False).get_weights()
    for init in (str(out), str(out / "model.keras")):
        model = EpisodicTrainer(tiny_config(sample_dir), sampler=None).model
        assert not all(np.array_equal(a, b) for a, b in zip(model.get_weights(), source, strict=True))
        _load_initial_weights(model, init)
        assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), source, strict=True))
    again = train(tiny_config(sample_dir, episodes=30, init_from=str(out)), tmp_path / "again", progress=False)
    info = json.loads((tmp_path / "again" / "model.json").read_text())["training"]
    assert again.episodes == 30 and info["init_from"] == str(out) and info["init_training"]["episodes"] == 60
    with pytest.raises(EdgemetaError, match="init_from: no model at"):
        train(tiny_config(sample_dir, init_from=str(tmp_path / "nothing")), tmp_path / "bad", progress=False)
    wrong = config_from_dict({**tiny_config(sample_dir, init_from=str(out)).to_dict(), "model": {"backbone": "resnet12"}})
    with pytest.raises(EdgemetaError, match="does not match the configured backbone"):
        train(wrong, tmp_path / "wrong", progress=False)


def test_random_affine_is_seeded_and_moves_the_strokes():
    import numpy as np
    import tensorflow as tf

    x = np.zeros((8, 28, 28, 1), np.float32)
    x[:, 10:18, 12:15] = 1.0
    seed = tf.constant([0, 7], tf.int64)
    assert np.array_equal(random_affine(x, seed, 0.0, 0.0, 0.0).numpy(), x)
    a = random_affine(x, seed, 0.1, 10.0, 0.1).numpy()
    assert np.array_equal(a, random_affine(x, seed, 0.1, 10.0, 0.1).numpy())
    assert not np.array_equal(a, random_affine(x, tf.constant([0, 8], tf.int64), 0.1, 10.0, 0.1).numpy())
    assert not np.array_equal(a[0], a[1])  # one draw per image
    rows = np.arange(28)[None, :, None, None]
    centre = (random_affine(x, seed, 0.1, 0.0, 0.0).numpy() * rows).sum((1, 2, 3)) / x.sum((1, 2, 3))
    assert np.all(np.abs(centre - 13.5) <= 2.8 + 0.5) and np.any(np.abs(centre - 13.5) > 0.3)


def test_trainval_trains_on_the_val_classes_and_keeps_the_last_weights(tmp_path, sample_dir):
    import numpy as np

    from edgemeta.host.data import load_dataset, merge_splits

    cfg = tiny_config(sample_dir, episodes=40, classes="trainval")
    splits = load_dataset(cfg.data, cfg.preprocess, ("train", "val"))
    both = merge_splits("trainval", splits["train"], splits["val"])
    assert both.num_classes == splits["train"].num_classes + splits["val"].num_classes
    assert len(both.images) == len(splits["train"].images) + len(splits["val"].images)
    first_val = both.class_indices()[splits["train"].num_classes]
    assert np.array_equal(both.images[first_val], splits["val"].images[splits["val"].class_indices()[0]])
    result = train(cfg, tmp_path, progress=False)
    info = json.loads((tmp_path / "model.json").read_text())["training"]
    assert result.best_episode == 40 and info["classes"] == "trainval" and "not held out" in info["validation"]


def test_tasks_computed_one_at_a_time_or_together_give_the_same_step(sample_dir):
    """[train] parallel_tasks only bounds how many tasks of a meta-batch are in memory at once."""
    import keras
    import numpy as np

    from edgemeta.host.data import EpisodeSampler, load_dataset

    weights = []
    cfg = tiny_config(sample_dir, meta_batch=3)
    split = load_dataset(cfg.data, cfg.preprocess, ("train",))["train"]
    for parallel in (1, 3):
        cfg = tiny_config(sample_dir, meta_batch=3, parallel_tasks=parallel)
        keras.utils.set_random_seed(0)
        trainer = EpisodicTrainer(cfg, EpisodeSampler(split, 5, 1, 3, seed=0))
        trainer.step(0)
        weights.append([w.copy() for w in trainer.model.get_weights()])
    keras.utils.set_random_seed(0)
    before = EpisodicTrainer(cfg, EpisodeSampler(split, 5, 1, 3, seed=0)).model.get_weights()
    assert any(not np.allclose(a, b) for a, b in zip(before, weights[0], strict=True))  # the step changed something
    for a, b in zip(*weights, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
