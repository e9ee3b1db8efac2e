import sys

import pytest

from edgemeta.errors import EdgemetaError
from edgemeta.host.config import config_from_dict, dump_toml, load_config


def test_round_trip(tmp_path):
    cfg = config_from_dict({"data": {"kind": "folder", "root": "x", "fractions": [0.5, 0.25, 0.25]},
                            "train": {"way": 10, "episodes": 50}, "validation": {"every": 10}})
    p = tmp_path / "c.toml"
    p.write_text(dump_toml(cfg))
    assert load_config(p) == cfg


def test_checkpoint_minutes_defaults_to_2_and_round_trips(tmp_path):
    assert config_from_dict({}).train.checkpoint_minutes == 2.0
    cfg = config_from_dict({"train": {"checkpoint_minutes": 0.5, "max_minutes": 12}})
    p = tmp_path / "c.toml"
    p.write_text(dump_toml(cfg))
    assert load_config(p) == cfg and load_config(p).train.checkpoint_minutes == 0.5


def test_config_checks_need_no_tensorflow():
    # every config error is reported before the 30-45 s TensorFlow import
    import subprocess

    code = ("import sys; from edgemeta.host.config import config_from_dict; "
            "config_from_dict({'method': {'name': 'maml', 'inner_steps': 2}, 'model': {'backbone': 'resnet12'}}); "
            "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_method_table_round_trips_and_the_old_spelling_still_reads(tmp_path):
    cfg = config_from_dict({"method": {"name": "maml", "first_order": True, "inner_lr": 0.1}})
    assert cfg.method.resolved.first_order and cfg.method.resolved.inner_lr == 0.1
    p = tmp_path / "c.toml"
    p.write_text(dump_toml(cfg))
    assert load_config(p).method.resolved == cfg.method.resolved
    assert config_from_dict({"model": {"algorithm": "protonet"}}).method.name == "protonet"


@pytest.mark.parametrize("raw, message", [
    ({"model": {"backbone": "vgg99"}}, "unknown backbone 'vgg99'"),
    ({"model": {"algorithm": "mystery"}}, "unknown method 'mystery'"),
    ({"method": {"name": "maml++"}}, "unknown method 'maml\\+\\+'; choose one of: protonet, maml, anil, metasgd"),
    ({"method": {"name": "maml", "inner_rate": 0.4}}, "unknown key 'inner_rate' in \\[method\\] for maml"),
    ({"method": {"name": "maml", "inner_steps": "5"}}, "inner_steps in \\[method\\] for maml must be an integer"),
    ({"method": {"name": "maml", "first_order": 1}}, "first_order in \\[method\\] for maml must be a boolean"),
    ({"method": {"name": "maml", "inner_steps": 0}}, "inner_steps must be in"),
    ({"method": {"name": "maml", "inner_lr": -1.0}}, "inner_lr must be in"),
    ({"method": {"name": "maml", "head_init": "random"}}, "head_init must be one of"),
    ({"method": {"name": "protonet", "inner_lr": 0.4}}, "unknown key 'inner_lr' in \\[method\\] for protonet"),
    ({"method": {"name": "maml"}, "model": {"algorithm": "protonet"}}, "disagree"),
    ({"train": {"lr_schedule": "linear"}}, "lr_schedule must be one of"),
    ({"train": {"meta_batch": 0}}, "meta_batch"),
    ({"train": {"parallel_tasks": 0}}, "parallel_tasks"),
    ({"train": {"wya": 5}}, "unknown key 'wya' in \\[train\\]"),
    ({"trian": {}}, "unknown section \\[trian\\]"),
    ({"train": {"way": "five"}}, "way in \\[train\\] must be an integer"),
    # one reader for every table (schema.table): a string is never a boolean, a fraction never a count
    ({"data": {"rotations": "false"}}, 'rotations in \\[data\\] must be a boolean, got "false"'),
    ({"model": {"invert": 0}}, "invert in \\[model\\] must be a boolean, got 0"),
    ({"train": {"way": 5.5}}, "way in \\[train\\] must be an integer, got 5.5"),
    ({"train": {"devices": "/cpu:0"}}, "devices in \\[train\\] must be a list of strings"),
    ({"data": {"fractions": [0.5, "0.5", 0]}}, "fractions in \\[data\\] must be a list of 3 finite numbers"),
    ({"data": {"kind": "imagenet"}}, "unknown dataset kind"),
    ({"data": {"split": "random"}}, "unknown Omniglot split"),
    ({"data": {"fractions": [0.5, 0.5, 0.5]}}, "fractions must be"),
    ({"validation": {"every": 0}}, "at least 1"),
    ({"train": {"augment_shift": 0.7}}, "augment_shift must be in"),
    ({"train": {"augment_rotate": -5}}, "augment_rotate in"),
    ({"train": {"classes": "all"}}, "classes must be 'train' or 'trainval'"),
    ({"train": {"max_minutes": -1}}, "\\[train\\] max_minutes must be a finite number of minutes, at least 0 \\(0: no limit\\)"),
    ({"train": {"max_minutes": float("nan")}}, "max_minutes must be a finite number"),
    ({"train": {"max_minutes": float("inf")}}, "max_minutes must be a finite number"),
    ({"train": {"max_minutes": True}}, "max_minutes in \\[train\\] must be a number"),
    ({"train": {"checkpoint_minutes": -0.5}}, "checkpoint_minutes must be a finite number of minutes, at least 0 \\(0: at validations"),
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
