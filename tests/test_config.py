"""Config loading: _base_ inheritance, --opts, typed validation and the errors a user sees."""

from pathlib import Path

import pytest
import yaml

from detkd.config import (
    ConfigError,
    StepCfg,
    config_from_dict,
    config_to_dict,
    dump_config,
    load_config,
    parse_opts,
)

REPO = Path(__file__).resolve().parents[1]

DATA = {
    "train": {"ann_file": "a/train.json", "img_dir": "a/train"},
    "val": {"ann_file": "a/val.json", "img_dir": "a/val"},
}


def write(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def recipe(tmp_path):
    write(tmp_path / "_base_" / "data.yaml", {"data": {**DATA, "batch_size": 4, "num_workers": 0}})
    write(tmp_path / "_base_" / "sched.yaml", {"train": {"epochs": 12, "optimizer": {"lr": 0.02}}})
    return write(
        tmp_path / "exp.yaml",
        {
            "_base_": ["_base_/data.yaml", "_base_/sched.yaml"],
            "model": {"arch": "retinanet", "backbone": "resnet18", "fpn_channels": 64},
            "train": {"epochs": 3},
        },
    )


def test_base_merge_child_wins_and_nested_keys_merge(recipe):
    cfg = load_config(recipe)
    assert cfg.train.epochs == 3  # the child overrides the base
    assert cfg.train.optimizer.lr == 0.02  # nested keys from the base survive
    assert cfg.train.optimizer.momentum == 0.9  # schema default
    assert cfg.data.batch_size == 4
    assert cfg.model.fpn_channels == 64
    assert cfg.name == "exp"


def test_later_base_wins_over_earlier(tmp_path):
    write(tmp_path / "a.yaml", {"data": DATA, "train": {"epochs": 1, "seed": 5}})
    write(tmp_path / "b.yaml", {"train": {"epochs": 2}})
    cfg = load_config(write(tmp_path / "c.yaml", {"_base_": ["a.yaml", "b.yaml"]}))
    assert (cfg.train.epochs, cfg.train.seed) == (2, 5)


def test_opts_override_with_yaml_values(recipe):
    cfg = load_config(
        recipe,
        ["train.epochs=7", "train.optimizer.type=adamw", "train.schedule.milestones=[2, 4]", "train.grad_clip=1"],
    )
    assert cfg.train.epochs == 7
    assert cfg.train.optimizer.type == "adamw"
    assert cfg.train.schedule.milestones == (2, 4)
    assert cfg.train.grad_clip == 1.0 and isinstance(cfg.train.grad_clip, float)


def test_exponent_floats_without_a_dot_are_numbers_in_files_and_opts(recipe, tmp_path):
    """YAML 1.1 (PyYAML's default) reads ``2e-3`` as a string; recipes follow YAML 1.2, where it is a float."""
    assert parse_opts(["a=2e-3", "b=1E5", "c=-.5e1", "d=1.0e-4", "e=2e", "f=.e1"]) == [
        ("a", 0.002), ("b", 100000.0), ("c", -5.0), ("d", 0.0001), ("e", "2e"), ("f", ".e1")
    ]  # fmt: skip
    assert load_config(recipe, ["train.optimizer.lr=2e-3"]).train.optimizer.lr == 0.002
    child = tmp_path / "child.yaml"
    child.write_text(f"_base_: {recipe}\ntrain: {{optimizer: {{lr: 3e-4}}}}\n")
    assert load_config(child).train.optimizer.lr == 0.0003
    assert yaml.safe_load("lr: 2e-3") == {"lr": "2e-3"}  # the loader's own rule, unchanged for other users


def test_parse_opts_rejects_malformed():
    assert parse_opts(["a.b=[1, 2]", "c=null"]) == [("a.b", [1, 2]), ("c", None)]
    with pytest.raises(ConfigError, match="dotted.key=value"):
        parse_opts(["train.epochs"])


def test_unknown_key_names_file_key_and_accepted_keys(recipe):
    data = yaml.safe_load(recipe.read_text())
    data["train"]["epoch"] = 2
    write(recipe, data)
    with pytest.raises(ConfigError) as err:
        load_config(recipe)
    msg = str(err.value)
    assert str(recipe) in msg and "'train.epoch'" in msg and "epochs" in msg and "warmup_iters" in msg


def test_unknown_key_in_base_names_the_base_file(tmp_path):
    base = write(tmp_path / "_base_" / "bad.yaml", {"data": {**DATA, "batchsize": 2}})
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path / "r.yaml", {"_base_": "_base_/bad.yaml"}))
    assert str(base) in str(err.value) and "'data.batchsize'" in str(err.value) and "batch_size" in str(err.value)


def test_wrong_type_names_key_and_expected_type(recipe):
    with pytest.raises(ConfigError, match=r"'train\.epochs': must be an integer, got 'ten'"):
        load_config(recipe, ["train.epochs=ten"])
    with pytest.raises(ConfigError, match=r"--opts: key 'data\.keep_empty': must be true or false"):
        load_config(recipe, ["data.keep_empty=3"])
    with pytest.raises(ConfigError, match=r"'train\.optimizer\.type': must be one of 'sgd', 'adamw'"):
        load_config(recipe, ["train.optimizer.type=adam"])


def test_missing_required_key(tmp_path):
    path = write(tmp_path / "r.yaml", {"data": {"train": DATA["train"], "val": {"img_dir": "x"}}})
    with pytest.raises(ConfigError, match=r"missing required key 'data\.val\.ann_file'"):
        load_config(path)


def test_bad_base_path_names_both_files(tmp_path):
    path = write(tmp_path / "r.yaml", {"_base_": ["nope.yaml"], "data": DATA})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "nope.yaml does not exist" in str(err.value) and str(path) in str(err.value)


def test_base_cycle_is_reported(tmp_path):
    write(tmp_path / "a.yaml", {"_base_": "b.yaml"})
    write(tmp_path / "b.yaml", {"_base_": "a.yaml"})
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")


def test_unsafe_yaml_tag_is_rejected(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("data: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_transform_steps_validated_against_registry(recipe):
    cfg = load_config(recipe, ["data.transforms.train=[{type: hflip, p: 0.25}]"])
    assert cfg.data.transforms.train == (StepCfg(type="hflip", params={"p": 0.25}),)
    with pytest.raises(ConfigError, match=r"unknown transform 'hflop'; valid: .*hflip"):
        load_config(recipe, ["data.transforms.train=[{type: hflop}]"])
    with pytest.raises(ConfigError, match=r"'data\.transforms\.train\.0\.prob': unknown key; accepted keys: p"):
        load_config(recipe, ["data.transforms.train=[{type: hflip, prob: 0.5}]"])
    with pytest.raises(ConfigError, match=r"'data\.transforms\.train\.0\.p': must be a number"):
        load_config(recipe, ["data.transforms.train=[{type: hflip, p: often}]"])


def test_opts_index_into_lists(recipe):
    cfg = load_config(recipe, ["data.transforms.train=[{type: hflip}]", "data.transforms.train.0.p=0.1"])
    assert cfg.data.transforms.train[0].params == {"p": 0.1}
    with pytest.raises(ConfigError, match="indexes a list of 1 items"):
        load_config(recipe, ["data.transforms.train=[{type: hflip}]", "data.transforms.train.3.p=0.1"])


def test_round_trip_through_dict_and_yaml(recipe, tmp_path):
    cfg = load_config(recipe, ["data.transforms.train=[{type: hflip, p: 0.3}]"])
    out = tmp_path / "resolved.yaml"
    dump_config(cfg, out)
    again = config_from_dict(yaml.safe_load(out.read_text()))
    assert again == cfg
    assert config_to_dict(cfg)["data"]["transforms"]["train"] == [{"type": "hflip", "p": 0.3}]


RECIPES = sorted(str(p.relative_to(REPO)) for p in (REPO / "configs").rglob("*.yaml") if "_base_" not in p.parts)


@pytest.mark.parametrize("path", RECIPES)
def test_every_shipped_recipe_loads(path):
    cfg = load_config(REPO / path)
    assert cfg.model is not None or ((cfg.teacher is not None or cfg.teachers) and cfg.student is not None)


def test_unknown_detector_and_backbone_list_valid_choices(recipe):
    with pytest.raises(ConfigError, match=r"'model\.arch': unknown detector 'retinet'; valid: .*retinanet"):
        load_config(recipe, ["model.arch=retinet"])
    with pytest.raises(ConfigError, match=r"'model\.backbone': unknown backbone 'resnet19'; valid: .*resnet18"):
        load_config(recipe, ["model.backbone=resnet19"])


def test_val_pipeline_must_have_fixed_geometry(recipe):
    cfg = load_config(recipe, ["data.transforms.val=[{type: letterbox, size: 64}, {type: color_jitter}]"])
    assert cfg.data.transforms.val[0].params == {"size": 64}
    with pytest.raises(ConfigError, match=r"key 'data\.transforms\.val': .*hflip.*fixed geometry"):
        load_config(recipe, ["data.transforms.val=[{type: hflip}]"])


def test_readme_example_recipe_is_valid(tmp_path):
    readme = (REPO / "README.md").read_text()
    block = readme.split("# configs/my_distill.yaml\n", 1)[1].split("```", 1)[0]
    cfg = load_config(write(tmp_path / "my_distill.yaml", yaml.safe_load(block)))
    assert cfg.teacher.arch == "faster_rcnn" and cfg.student.arch == "retinanet"
    assert [f.type for f in cfg.distill.features] == ["fgd"] and cfg.distill.head[0].params["mode"] == "merge"
