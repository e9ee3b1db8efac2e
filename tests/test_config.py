import pytest

from edgemeta.backbones import BACKBONES
from edgemeta.config import ALGORITHMS, BACKBONE_NAMES, config_from_dict, dump_toml, load_config
from edgemeta.errors import EdgemetaError
from edgemeta.methods import METHODS


def test_round_trip(tmp_path):
    cfg = config_from_dict({"data": {"kind": "folder", "root": "x", "fractions": [0.5, 0.25, 0.25]},
                            "train": {"way": 10, "episodes": 50}, "validation": {"every": 10}})
    p = tmp_path / "c.toml"
    p.write_text(dump_toml(cfg))
    assert load_config(p) == cfg


def test_registries_agree():
    assert set(BACKBONE_NAMES) == set(BACKBONES) and set(ALGORITHMS) == set(METHODS)


@pytest.mark.parametrize("raw, message", [
    ({"model": {"backbone": "vgg99"}}, "unknown backbone 'vgg99'"),
    ({"model": {"algorithm": "mystery"}}, "unknown algorithm 'mystery'"),
    ({"train": {"wya": 5}}, "unknown key 'wya' in \\[train\\]"),
    ({"trian": {}}, "unknown section \\[trian\\]"),
    ({"train": {"way": "five"}}, "way must be a number"),
    ({"data": {"kind": "imagenet"}}, "unknown dataset kind"),
    ({"data": {"split": "random"}}, "unknown Omniglot split"),
    ({"data": {"fractions": [0.5, 0.5, 0.5]}}, "fractions must be"),
    ({"validation": {"every": 0}}, "at least 1"),
    ({"train": {"augment_shift": 0.7}}, "augment_shift must be in"),
    ({"train": {"augment_rotate": -5}}, "augment_rotate in"),
    ({"train": {"classes": "all"}}, "classes must be 'train' or 'trainval'"),
])
def test_bad_configs(raw, message):
    with pytest.raises(EdgemetaError, match=message):
        config_from_dict(raw)


def test_bad_files(tmp_path):
    with pytest.raises(EdgemetaError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    (tmp_path / "bad.toml").write_text("[train\nway = 5")
    with pytest.raises(EdgemetaError, match="not valid TOML"):
        load_config(tmp_path / "bad.toml")
