import shutil
import zipfile

import numpy as np
import pytest
from PIL import Image

from edgemeta.errors import EdgemetaError
from edgemeta.host.data import DatasetSpec, EpisodeSampler, load_dataset
from edgemeta.host.data.dataset import LAKE_VAL_ALPHABETS, load_omniglot
from edgemeta.preprocess import Preprocess

PRE = Preprocess(28, 1, invert=True)


@pytest.mark.slow  # decodes the whole Omniglot
def test_vinyals_split_sizes_and_rotations(omniglot_dir):
    splits = load_dataset(DatasetSpec(root=str(omniglot_dir), split="vinyals"), PRE)
    assert {k: s.num_classes for k, s in splits.items()} == {"train": 4112, "val": 688, "test": 1692}
    test = splits["test"]
    assert test.images.shape == (1692 * 20, 28, 28, 1) and test.images.dtype == np.uint8
    # a rotated class holds the same drawings as its unrotated character, turned
    names = test.class_names
    base = names.index("Gurmukhi/character42/rot000")
    turned = names.index("Gurmukhi/character42/rot090")
    idx = test.class_indices()
    np.testing.assert_array_equal(np.rot90(test.images[idx[base]], 1, axes=(1, 2)), test.images[idx[turned]])
    # train, val and test characters are disjoint
    chars = {k: {n.rsplit("/", 1)[0] for n in s.class_names} for k, s in splits.items()}
    assert not (chars["train"] & chars["test"]) and not (chars["val"] & chars["test"]) and not (chars["train"] & chars["val"])


def test_omniglot_preprocessing_inverts_strokes(omniglot_dir):
    images, names, background = load_omniglot(str(omniglot_dir), PRE)
    assert images.shape == (1623, 20, 28, 28, 1) and len(names) == 1623 and background.sum() == 964
    # strokes are the minority of pixels and, inverted, the bright ones
    assert images.mean() < 60


def test_lake_split_holds_out_whole_alphabets(omniglot_dir):
    splits = load_dataset(DatasetSpec(root=str(omniglot_dir), split="lake"), PRE)
    alphabets = {k: {n.split("/")[0] for n in s.class_names} for k, s in splits.items()}
    assert splits["test"].num_classes == 659
    assert alphabets["val"] == set(LAKE_VAL_ALPHABETS)
    assert not (alphabets["train"] & alphabets["val"]) and not (alphabets["train"] & alphabets["test"])
    assert splits["train"].num_classes == 4 * (964 - splits["val"].num_classes)  # rotations as classes


def test_extracted_folders_equal_zips(mini_omniglot, tmp_path):
    for part in ("images_background", "images_evaluation"):
        with zipfile.ZipFile(mini_omniglot / f"{part}.zip") as z:
            z.extractall(tmp_path)
    a, na, _ = load_omniglot(str(mini_omniglot), PRE)
    b, nb, _ = load_omniglot(str(tmp_path), PRE)
    assert na == nb
    np.testing.assert_array_equal(a, b)


def test_cache_is_reused_and_invalidated(mini_omniglot, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEMETA_CACHE", str(tmp_path / "c"))
    load_omniglot(str(mini_omniglot), PRE)
    files = list((tmp_path / "c").glob("omniglot-*.npz"))
    assert len(files) == 1
    load_omniglot(str(mini_omniglot), Preprocess(32, 1, invert=True))  # other settings, other entry
    assert len(list((tmp_path / "c").glob("omniglot-*.npz"))) == 2
    import edgemeta.host.data.dataset as ds

    monkeypatch.setattr(ds, "_decode_omniglot", lambda *a: (_ for _ in ()).throw(AssertionError("decoded again")))
    images, _, _ = load_omniglot(str(mini_omniglot), PRE)  # served from the cache
    assert images.shape[2:] == (28, 28, 1)


def test_env_variable_locates_omniglot(mini_omniglot, monkeypatch):
    monkeypatch.setenv("EDGEMETA_OMNIGLOT", str(mini_omniglot))
    assert load_dataset(DatasetSpec(split="lake"), PRE, ("test",))["test"].num_classes == 51


@pytest.mark.parametrize("damage, message", [
    ("missing", "has neither images_background.zip"),
    ("corrupt", "is not a readable zip"),
    ("empty", "no Omniglot images found"),
])
def test_bad_omniglot_folders(mini_omniglot, tmp_path, damage, message):
    shutil.copy(mini_omniglot / "images_evaluation.zip", tmp_path)
    if damage == "corrupt":
        (tmp_path / "images_background.zip").write_bytes(b"PK\x03\x04 this is not a zip")
    elif damage == "empty":
        zipfile.ZipFile(tmp_path / "images_background.zip", "w").close()
    with pytest.raises(EdgemetaError, match=message):
        load_omniglot(str(tmp_path), PRE)


def test_no_location_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("EDGEMETA_OMNIGLOT", raising=False)
    with pytest.raises(EdgemetaError, match="EDGEMETA_OMNIGLOT"):
        load_dataset(DatasetSpec(), PRE)


def _image_folder(root, classes=10, per_class=8, size=(40, 30), mode="RGB"):
    rng = np.random.default_rng(0)
    for c in range(classes):
        d = root / f"class_{c:02d}"
        d.mkdir(parents=True)
        for i in range(per_class):
            arr = rng.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(arr).convert(mode).save(d / f"{i}.{'jpg' if i % 2 else 'png'}")
    return root


def test_folder_dataset_any_size_rgb_and_seeded_split(tmp_path):
    root = _image_folder(tmp_path / "data")
    pre = Preprocess(32, 3)
    spec = DatasetSpec(kind="folder", root=str(root), fractions=(0.6, 0.2, 0.2), seed=3)
    a = load_dataset(spec, pre)
    assert [a[k].num_classes for k in ("train", "val", "test")] == [6, 2, 2]
    assert a["train"].images.shape == (48, 32, 32, 3)
    names = [n for s in a.values() for n in s.class_names]
    assert sorted(names) == [f"class_{c:02d}" for c in range(10)]
    b = load_dataset(spec, pre)
    assert a["test"].class_names == b["test"].class_names
    c = load_dataset(DatasetSpec(kind="folder", root=str(root), seed=4), pre)
    assert c["train"].class_names != a["train"].class_names


def test_folder_sample_grayscale(sample_dir):
    test = load_dataset(DatasetSpec(kind="folder", root=str(sample_dir), fractions=(0, 0, 1)), PRE, ("test",))["test"]
    assert test.num_classes == 51 and test.images.shape == (1020, 28, 28, 1)


@pytest.mark.parametrize("damage, message", [
    ("empty", "no images found"),
    ("text", "is not an image"),
    ("corrupt", "cannot read image"),
    ("nofolder", "does not exist"),
])
def test_bad_folders(tmp_path, damage, message):
    root = tmp_path / "data"
    if damage != "nofolder":
        root.mkdir()
    if damage in ("text", "corrupt"):
        _image_folder(root, classes=3)
        name = "notes.txt" if damage == "text" else "broken.png"
        (root / "class_01" / name).write_bytes(b"not an image")
    with pytest.raises(EdgemetaError, match=message):
        load_dataset(DatasetSpec(kind="folder", root=str(root)), Preprocess(28, 1))


def test_episodes_are_seeded_and_well_formed(sample_dir):
    split = load_dataset(DatasetSpec(kind="folder", root=str(sample_dir), fractions=(0, 0, 1)), PRE, ("test",))["test"]
    s = EpisodeSampler(split, way=5, shot=2, query=3, seed=7)
    e1, e2 = s.episode(11), EpisodeSampler(split, 5, 2, 3, seed=7).episode(11)
    np.testing.assert_array_equal(e1.support, e2.support)
    np.testing.assert_array_equal(e1.query, e2.query)
    assert not np.array_equal(s.episode(12).classes, e1.classes) or not np.array_equal(s.episode(12).support, e1.support)
    assert e1.support.shape == (10, 28, 28, 1) and e1.query.shape == (15, 28, 28, 1)
    assert list(e1.support_labels) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    classes, sup, qry = s.indices(11)
    assert len(set(classes)) == 5 and not set(sup) & set(qry)
    assert all(split.labels[i] == classes[k // 2] for k, i in enumerate(sup))


def test_episode_errors_say_what_to_change(sample_dir):
    split = load_dataset(DatasetSpec(kind="folder", root=str(sample_dir), fractions=(0, 0, 1)), PRE, ("test",))["test"]
    with pytest.raises(EdgemetaError, match="need 60 classes"):
        EpisodeSampler(split, way=60, shot=1, query=1)
    with pytest.raises(EdgemetaError, match="has 20 images but 5-shot 16-query"):
        EpisodeSampler(split, way=5, shot=5, query=16)


def test_within_alphabet_episodes_draw_every_class_from_one_alphabet(mini_omniglot, sample_dir):
    test = load_dataset(DatasetSpec(root=str(mini_omniglot), split="lake"), PRE, ("test",))["test"]
    groups = test.class_groups()
    assert sorted(len(g) for g in groups) == [25, 26]  # Tengwar, Keble
    alphabet = [n.split("/")[0] for n in test.class_names]
    s = EpisodeSampler(test, way=20, shot=1, query=5, seed=3, within_groups=True)
    seen = set()
    for i in range(30):
        classes, _, _ = s.indices(i)
        assert len({alphabet[c] for c in classes}) == 1 and len(set(classes)) == 20
        seen.add(alphabet[classes[0]])
    assert seen == {"Keble", "Tengwar"}  # both drawn, not always the first
    # the whole-split sampler mixes alphabets in almost every 20-way episode
    mixed = EpisodeSampler(test, way=20, shot=1, query=5, seed=3)
    assert sum(len({alphabet[c] for c in mixed.indices(i)[0]}) > 1 for i in range(30)) >= 28
    np.testing.assert_array_equal(s.indices(4)[1], EpisodeSampler(test, 20, 1, 5, seed=3, within_groups=True).indices(4)[1])
    # only Keble has 26 characters: 26-way episodes all come from it; 27-way from none
    assert {alphabet[EpisodeSampler(test, 26, 1, 1, within_groups=True).indices(i)[0][0]] for i in range(5)} == {"Keble"}
    with pytest.raises(EdgemetaError, match="need an alphabet with 27 classes; the test split's largest has 26"):
        EpisodeSampler(test, way=27, shot=1, query=1, within_groups=True)
    folder = load_dataset(DatasetSpec(kind="folder", root=str(sample_dir), fractions=(0, 0, 1)), PRE, ("test",))["test"]
    with pytest.raises(EdgemetaError, match="carry no alphabet"):
        EpisodeSampler(folder, way=5, shot=1, query=1, within_groups=True)


def test_within_alphabet_evaluation_is_harder_and_skips_settings_no_alphabet_fits(mini_omniglot):
    from edgemeta.host.evaluate import evaluate
    from edgemeta.host.methods import get_method

    test = load_dataset(DatasetSpec(root=str(mini_omniglot), split="lake"), PRE, ("test",))["test"]
    # a fixed embedding that tells alphabets apart well and characters within one poorly:
    # the alphabet's one-hot plus a small per-character code plus noise
    rng = np.random.default_rng(0)
    alphabet = np.array([0 if n.startswith("Keble") else 1 for n in test.class_names])
    char_code = rng.normal(size=(test.num_classes, 8))
    noise = rng.normal(scale=1.2, size=(len(test.labels), 8))
    emb = np.concatenate([10 * np.eye(2)[alphabet[test.labels]], char_code[test.labels] + noise], axis=1)
    classify = get_method("protonet").classify
    mixed, = evaluate(None, classify, test, ((5, 1),), episodes=100, embeddings=emb)
    within, skipped = evaluate(None, classify, test, ((5, 1), (30, 1)), episodes=100, embeddings=emb, within_groups=True)
    assert within.accuracy < mixed.accuracy - 5
    assert skipped.episodes == 0 and "largest alphabet has only 26 classes" in skipped.note
