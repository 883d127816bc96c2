"""Every example config loads and names registered components with valid options."""

from __future__ import annotations

from pathlib import Path

import pytest

from tiahnm.config import load_config
from tiahnm.validate import validate_config

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml"))


def test_examples_are_found():
    names = {p.name for p in EXAMPLES}
    assert {
        "ucsb_breast.yaml",
        "ucsb_breast_mhim.yaml",
        "musk1_abmil_gated.yaml",
    } <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_config_validates(path):
    config = load_config(path)
    validate_config(config, warn=lambda w: None)
    assert config.output_dir


def test_mhim_example_pairs_with_its_baseline():
    base = load_config(EXAMPLES[0].parent / "ucsb_breast.yaml")
    mhim = load_config(EXAMPLES[0].parent / "ucsb_breast_mhim.yaml")
    # {fold_name} must name the same split in both runs
    assert (base.seed, base.cv) == (mhim.seed, mhim.cv)
    assert mhim.miner.options["teacher_init"].startswith(base.output_dir + "/folds/")
    assert base.to_dict()["head"] == mhim.to_dict()["head"]
    assert base.to_dict()["train"] == mhim.to_dict()["train"]
