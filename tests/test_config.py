import pytest
import yaml

from tiahnm.config import (
    Config,
    apply_override,
    from_dict,
    iter_schema,
    load_config,
    save_config,
    template,
)
from tiahnm.errors import ConfigError


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_defaults_round_trip(tmp_path):
    cfg = load_config()
    assert isinstance(cfg, Config)
    save_config(cfg, tmp_path / "saved.yaml")
    again = load_config(tmp_path / "saved.yaml")
    assert again.to_dict() == cfg.to_dict()


def test_template_is_valid_and_commented(tmp_path):
    text = template()
    assert text.count("#") > 30
    cfg = from_dict(yaml.safe_load(text))
    assert cfg.to_dict() == Config().to_dict()
    keys = {row[0] for row in iter_schema()}
    assert {"train.epochs", "cv.folds", "head.options", "evaluation.threshold"} <= keys


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("trian: {epochs: 3}", "Unknown config key 'trian'"),
        ("train: {epochz: 3}", "Unknown config key 'train.epochz'"),
        ("train: {epochs: three}", "train.epochs: expected int, got str"),
        ("train: {epochs: 2.5}", "train.epochs: expected int"),
        ("train: {lr: fast}", "train.lr: expected float"),
        ("train: {optimizer: rmsprop}", "train.optimizer: 'rmsprop' is not one of"),
        ("data: {standardize: 'yes'}", "data.standardize: expected bool"),
        ("head: {options: [1, 2]}", "head.options: expected dict"),
        ("losses: {name: mirank}", "losses: expected list"),
        (
            "losses: [{name: mirank, wieght: 1}]",
            "Unknown config key 'losses[0].wieght'",
        ),
        ("cv: {folds: 1}", "cv.folds must be >= 2"),
        ("- a\n- b", "top level must be a mapping"),
        ("train: [", "not valid YAML"),
    ],
)
def test_invalid_configs_name_the_key(tmp_path, text, fragment):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert fragment in str(info.value)
    assert str(path) in str(info.value)


def test_scientific_notation_and_int_to_float(tmp_path):
    cfg = load_config(write(tmp_path, "train: {lr: 1e-4, weight_decay: 0}"))
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float)
    assert cfg.train.weight_decay == 0.0 and isinstance(cfg.train.weight_decay, float)
    cfg = load_config(write(tmp_path, "train: {lr: 2.5E-3, weight_decay: 1}"))
    assert (cfg.train.lr, cfg.train.weight_decay) == (2.5e-3, 1.0)


def test_overrides():
    cfg = load_config(
        None,
        [
            "train.epochs=7",
            "head.name=dsmil",
            "head.options.embed_dim=64",
            "losses=[{name: mirank, weight: 0.1}]",
        ],
    )
    assert cfg.train.epochs == 7
    assert cfg.head.name == "dsmil"
    assert cfg.head.options == {"embed_dim": 64}
    assert cfg.losses[0].name == "mirank" and cfg.losses[0].weight == pytest.approx(0.1)


@pytest.mark.parametrize("item", ["novalue", "=3", "a..b=1"])
def test_bad_override_syntax(item):
    with pytest.raises(ConfigError):
        apply_override({}, item)


def test_override_wrong_type_names_key():
    with pytest.raises(ConfigError, match=r"train\.epochs"):
        load_config(None, ["train.epochs=abc"])


def test_missing_file():
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("/nonexistent/config.yaml")


def test_configuration_reference_is_current():
    from pathlib import Path

    from tiahnm.config import reference_markdown

    doc = Path(__file__).parents[1] / "docs" / "configuration.md"
    assert doc.read_text() == reference_markdown(), (
        "run: python -m tiahnm.config > docs/configuration.md"
    )


def test_refit_with_rounds_is_a_config_error() -> None:
    """cv.refit retrains for one epoch count: with rounds > 1 it is refused, named."""
    with pytest.raises(ConfigError, match=r"cv\.refit.*train\.rounds > 1"):
        from_dict({"train": {"rounds": 2}, "cv": {"refit": True}})
    assert from_dict({"train": {"rounds": 2}, "cv": {"refit": False}}).train.rounds == 2
    assert from_dict({"train": {"rounds": 1}, "cv": {"refit": True}}).cv.refit
