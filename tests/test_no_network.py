"""Training and extraction run with every network connection refused."""

from __future__ import annotations

import json
import socket

import pytest

from tests.slides.conftest import make_image, write_pyramid
from tests.synthetic import make_bags, write_mil_csv
from tiahnm.config import load_config


@pytest.fixture
def no_network(monkeypatch):
    """Refuse connections and name look-ups; record who tried."""
    attempts: list[str] = []

    def refuse(what):
        def blocked(*args, **kwargs):
            address = args[1] if what.startswith("connect") else args[0]
            attempts.append(f"{what} {address}")
            raise OSError(f"network access blocked in tests ({what})")

        return blocked

    monkeypatch.setattr(socket.socket, "connect", refuse("connect"))
    monkeypatch.setattr(socket.socket, "connect_ex", refuse("connect_ex"))
    monkeypatch.setattr(socket, "create_connection", refuse("create_connection"))
    monkeypatch.setattr(socket, "getaddrinfo", refuse("getaddrinfo"))
    return attempts


def test_blocking_works(no_network):
    with pytest.raises(OSError, match="blocked"):
        socket.create_connection(("example.org", 80), timeout=1)
    assert no_network == ["create_connection ('example.org', 80)"]


def test_training_and_extraction_offline(no_network, tmp_path):
    from tiahnm.crossval import run_training
    from tiahnm.slides.extract import ExtractConfig, extract_features
    from tiahnm.slides.tiling import TilingConfig

    csv = tmp_path / "bags.csv"
    write_mil_csv(csv, make_bags(12, dim=4))
    config = load_config(
        None,
        [
            "data.source=mil_csv",
            f"data.options.path={csv}",
            f"output_dir={tmp_path / 'run'}",
            "train.epochs=2",
            "cv.folds=2",
            "evaluation.bootstrap=0",
            "evaluation.report=false",
            "head.options.embed_dim=8",
        ],
    )
    summary = run_training(config)
    assert summary["n_folds"] == 2
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["n_folds"] == 2

    slides = tmp_path / "slides"
    slides.mkdir()
    write_pyramid(slides / "s.tif", make_image())
    cfg = ExtractConfig(
        tiling=TilingConfig(resolution=2.0, patch_size=64), num_workers=0
    )
    result = extract_features([slides], tmp_path / "feats", cfg)
    assert [r.status for r in result.results] == ["done"]
    assert (tmp_path / "feats" / "s.h5").is_file()
    assert no_network == []
