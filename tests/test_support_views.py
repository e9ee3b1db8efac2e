"""Support views: a ProtoNet head's enrolled samples embedded as the mean over small moves of each image,
the same on the host (eval, export) and on the board (enroll, reenroll)."""

import json
import shutil

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgemeta.errors import EdgemetaError
from edgemeta.runtime.fewshot import FewShotRuntime
from edgemeta.runtime.heads.common import VIEW_DIRECTIONS, embed_support, support_views
from edgemeta.runtime.store import EnrollmentStore
from tests.support.builders import SHIPPED, drawings
from tests.support.cli import one_line_error, run


@settings(max_examples=40, deadline=None)
@given(shift=st.integers(0, 4), size=st.integers(5, 12), seed=st.integers(0, 2**16))
def test_each_view_moves_the_image_and_fills_the_border_with_its_background(shift, size, seed):
    images = np.random.default_rng(seed).integers(0, 256, (3, size, size, 1), dtype=np.uint8)
    views = support_views(images, shift)
    assert len(views) == (1 if shift == 0 else 5) and views[0] is images
    for (dy, dx), view in zip(VIEW_DIRECTIONS[:len(views) - 1], views[1:], strict=True):
        dy, dx = dy * shift, dx * shift
        for y in range(size):
            for x in range(size):
                sy, sx = y - dy, x - dx
                inside = 0 <= sy < size and 0 <= sx < size
                expected = images[:, sy, sx] if inside else images[:, 0, 0]
                assert (view[:, y, x] == expected).all(), (dy, dx, y, x)


def test_the_support_embedding_is_the_mean_over_the_views():
    images = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 1), dtype=np.uint8)

    def embed(x):  # a stand-in backbone that sees where the ink is: row and column profiles
        return np.concatenate([x.mean(axis=(2, 3)), x.mean(axis=(1, 3))], axis=1).astype(np.float32)

    assert np.array_equal(embed_support(embed, images, 0), embed(images))
    mean = np.mean([embed(v) for v in support_views(images, 2)], axis=0)
    assert np.allclose(embed_support(embed, images, 2), mean, atol=1e-5)
    assert not np.allclose(mean, embed(images))


def with_support_shift(dst, shift):
    """A copy of the shipped model (board files only) whose manifest head enrolls with support views."""
    shutil.copytree(SHIPPED, dst, ignore=shutil.ignore_patterns("model.keras", "*.png", "*.csv", "tensorboard"))
    m = json.loads((dst / "manifest.json").read_text())
    m["head"]["support_shift"] = shift
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst


def test_the_board_enrolls_and_reenrolls_the_mean_over_the_views(tmp_path):
    files = drawings("Keble_character01", [1, 2])
    plain = FewShotRuntime(with_support_shift(tmp_path / "plain", 0))
    views = FewShotRuntime(with_support_shift(tmp_path / "views", 3))
    assert (plain.support_shift, views.support_shift) == (0, 3)
    images, _ = views.images(files)
    views.enroll(tmp_path / "s", "a", files, keep_samples=True)
    views.enroll(tmp_path / "s", "b", drawings("Keble_character05", [1, 2]), keep_samples=True)
    stored = EnrollmentStore.open(tmp_path / "s").embeddings[:2]
    expected = np.mean([views.embedder(v) for v in support_views(images, 3)], axis=0)
    assert np.allclose(stored, expected, atol=1e-5)
    assert not np.allclose(stored, views.embedder(images), atol=1e-3)
    views.reenroll(tmp_path / "s")  # a model upgrade re-embeds the kept samples the same way
    assert np.allclose(EnrollmentStore.open(tmp_path / "s").embeddings[:2], expected, atol=1e-5)
    # queries keep one view: the other drawings of the enrolled character are still found
    top = [r["top"][0]["label"] for r in views.classify(tmp_path / "s", drawings("Keble_character01", [3, 4, 5]))]
    assert top == ["a", "a", "a"]
    # the store keeps each sample's one-view embedding too: the open-set calibration asks it as a query
    kept = EnrollmentStore.open(tmp_path / "s")
    assert np.allclose(kept.query_embeddings[:2], views.embedder(images), atol=1e-6) and kept.backbone["support_shift"] == 3
    plain.enroll(tmp_path / "p", "a", files)
    p = EnrollmentStore.open(tmp_path / "p")
    assert np.allclose(p.embeddings, views.embedder(images), atol=1e-6) and p.query_embeddings is None
    assert "support_shift" not in p.backbone


def test_stores_of_views_and_of_plain_embeddings_never_mix(tmp_path):
    plain = FewShotRuntime(with_support_shift(tmp_path / "plain", 0))
    views = FewShotRuntime(with_support_shift(tmp_path / "views", 2))
    a, b = drawings("Keble_character01", [1, 2]), drawings("Keble_character05", [1, 2])
    views.enroll(tmp_path / "v", "a", a, keep_samples=True)
    plain.enroll(tmp_path / "p", "a", a, keep_samples=False)
    before = {k: (tmp_path / k / "store.npz").read_bytes() for k in ("v", "p")}
    with pytest.raises(EdgemetaError, match="enrolled with support views of 2 px.*no support views.*reenroll"):
        plain.enroll(tmp_path / "v", "b", b)
    with pytest.raises(EdgemetaError, match="enrolled with no support views.*support views of 2 px.*new store"):
        views.enroll(tmp_path / "p", "b", b)
    assert {k: (tmp_path / k / "store.npz").read_bytes() for k in ("v", "p")} == before
    assert plain.reenroll(tmp_path / "v") == 2  # the kept samples move to the plain model
    s = EnrollmentStore.open(tmp_path / "v")
    assert s.query_embeddings is None and "support_shift" not in s.backbone
    plain.enroll(tmp_path / "v", "b", b)


def test_calibration_asks_the_held_out_sample_as_a_query_would_be(tmp_path):
    from edgemeta.runtime.heads.open_set import leave_one_out

    views = FewShotRuntime(with_support_shift(tmp_path / "views", 3))
    store = tmp_path / "s"
    for c in ("Keble_character01", "Keble_character05", "Tengwar_character03"):
        views.enroll(store, c, drawings(c, range(1, 6)))
    views.set_open_set(store, "calibrated", accept=0.95)
    s = EnrollmentStore.open(store)
    known, _ = leave_one_out(s.embeddings, s.labels, 3, "squared_euclidean", queries=s.query_embeddings)
    tight, _ = leave_one_out(s.embeddings, s.labels, 3, "squared_euclidean")
    assert s.open_set["report"]["threshold"] == pytest.approx(float(np.quantile(known, 0.95)), rel=1e-4)
    assert np.median(known) > np.median(tight)  # one view sits farther from a prototype than a mean of views
    damaged = dict(np.load(store / "store.npz"))
    del damaged["query_embeddings"]
    np.savez(store / "store.npz", **damaged)
    one_line_error(run("classes", "--store", str(store)), "query_embeddings")


@pytest.mark.parametrize("bad", [-1, 8, "2", 2.5, True])
def test_a_bad_support_shift_in_the_manifest_is_one_line_and_writes_nothing(tmp_path, bad):
    model = with_support_shift(tmp_path / "m", bad)
    one_line_error(run("enroll", "--store", str(tmp_path / "s"), "--model", str(model), "--label", "a",
                       *drawings("Keble_character01", [1])), "support_shift")
    assert not (tmp_path / "s").exists()


def test_protonet_refuses_a_shift_below_zero_or_past_a_quarter_of_the_image():
    from edgemeta.host.backbones import build_backbone
    from edgemeta.host.methods import get_method

    with pytest.raises(EdgemetaError, match="support_shift must be 0 or more"):
        get_method("protonet", {"support_shift": -1})
    method = get_method("protonet", {"support_shift": 8})
    with pytest.raises(EdgemetaError, match="at most 7 pixels"):
        method.build(build_backbone("conv4", (28, 28, 1)), 5)
    assert get_method("protonet", {"support_shift": 3}).head_spec()["support_shift"] == 3
    assert "support_shift" not in get_method("protonet").head_spec()


def test_export_and_eval_measure_what_the_board_enrolls(exported, tmp_path, sample_dir):
    from edgemeta.host.export import export_model
    from edgemeta.host.model_eval import evaluate_model_dir

    model = tmp_path / "views"
    shutil.copytree(exported, model)
    info = json.loads((model / "model.json").read_text())
    info["method"] = {**info.get("method", {"name": "protonet"}), "support_shift": 2}
    (model / "model.json").write_text(json.dumps(info))
    manifest = export_model(model, folder=str(sample_dir), episodes=50, log=lambda m: None)
    assert manifest["head"]["support_shift"] == 2 and FewShotRuntime(model).support_shift == 2

    def figures(path, **kw):
        results, context, _, _ = evaluate_model_dir(str(path), folder=str(sample_dir), settings=((5, 1),), episodes=50, **kw)
        return results[0].accuracy, context["backend"]

    assert "moved 2 px" in figures(model, variant="int8_static")[1]
    assert "support views" not in figures(model, variant="int8_static", support_shift=0)[1]
    keras_views, keras_off = figures(model)[0], figures(model, support_shift=0)[0]
    assert keras_off == figures(exported)[0]  # shift 0 is the plain model's answer
    assert keras_views != keras_off  # the views change the prototypes (a test that can fail)
    p = run("eval", "--model", str(model), "--folder", str(sample_dir), "--setting", "5w1s", "--episodes", "5",
            "--support-shift", "9")
    one_line_error(p, "at most 7 pixels")
