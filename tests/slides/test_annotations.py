from __future__ import annotations

import json
import shutil

import numpy as np
from click.testing import CliRunner

from tiahnm.cli import cli
from tiahnm.data.h5_features import H5FeatureFolder
from tiahnm.slides.annotations import label_patches

# nine 100 x 100 patches on a 3 x 3 grid (level-0 pixels)
COORDS = np.array([(x, y) for y in (0, 100, 200) for x in (0, 100, 200)])


def square(x0, y0, x1, y1):
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def test_geojson_polygon_overlap(tmp_path):
    path = tmp_path / "s.geojson"
    feature = {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": [square(0, 0, 150, 100)]},
        "properties": {"classification": {"name": "Tumor"}},
    }
    other = {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": [square(200, 200, 300, 300)]},
        "properties": {"classification": {"name": "Stroma"}},
    }
    path.write_text(
        json.dumps({"type": "FeatureCollection", "features": [feature, other]})
    )
    res = label_patches(path, COORDS, 100.0, min_overlap=0.5)
    np.testing.assert_allclose(res.overlap, [1, 0.5, 0, 0, 0, 0, 0, 0, 1], atol=1e-6)
    np.testing.assert_array_equal(res.labels, [1, 1, 0, 0, 0, 0, 0, 0, 1])
    tumour = label_patches(path, COORDS, 100.0, min_overlap=0.6, classes=["Tumor"])
    np.testing.assert_array_equal(tumour.labels, [1, 0, 0, 0, 0, 0, 0, 0, 0])
    assert tumour.attrs["annotation_format"] == "geojson"


def test_asap_xml_with_exclusion(tmp_path):
    def ann(group, pts):
        coords = "".join(
            f'<Coordinate Order="{i}" X="{x}" Y="{y}"/>' for i, (x, y) in enumerate(pts)
        )
        return f'<Annotation Name="a" Type="Polygon" PartOfGroup="{group}"><Coordinates>{coords}</Coordinates></Annotation>'

    xml = (
        "<ASAP_Annotations><Annotations>"
        + ann("Tumor", square(0, 0, 200, 200)[:4])
        + ann("_2", square(100, 100, 200, 200)[:4])
        + "</Annotations></ASAP_Annotations>"
    )
    path = tmp_path / "s.xml"
    path.write_text(xml)
    res = label_patches(path, COORDS, 100.0)
    np.testing.assert_allclose(res.overlap, [1, 1, 0, 1, 0, 0, 0, 0, 0], atol=1e-6)


def test_mask_image(tmp_path):
    from PIL import Image

    mask = np.zeros((30, 30), dtype=np.uint8)
    mask[:, :15] = 255  # left half of a 300 x 300 slide
    Image.fromarray(mask).save(tmp_path / "m.png")
    res = label_patches(tmp_path / "m.png", COORDS, 100.0, dimensions=(300, 300))
    np.testing.assert_allclose(res.overlap[:3], [1, 0.5, 0], atol=1e-6)


def test_extract_stores_instance_labels(slide_dir, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(slide_dir / "syn_a.tif", folder / "syn_a.tif")
    ann = tmp_path / "ann"
    ann.mkdir()
    # the left half of the tissue (level-0 x 256..512) is "tumour"
    (ann / "syn_a.geojson").write_text(
        json.dumps({"type": "Polygon", "coordinates": [square(256, 256, 512, 640)]})
    )
    out = tmp_path / "out"
    base = [
        str(folder),
        "--output-path",
        str(out),
        "--resolution",
        "1.0",
        "--patch-size",
        "64",
        "--num-workers",
        "0",
    ]
    res = CliRunner().invoke(cli, ["extract", *base])
    assert res.exit_code == 0, res.output
    # adding annotations later labels the finished file without re-encoding
    res = CliRunner().invoke(cli, ["extract", *base, "--annotations", str(ann)])
    assert "skipped syn_a" in res.output
    (tmp_path / "labels.csv").write_text("slide_id,label\nsyn_a,1\n")
    (bag,) = H5FeatureFolder(str(out), str(tmp_path / "labels.csv")).load()
    assert bag.instance_labels is not None and len(bag.instance_labels) == 12
    expected = (bag.coords[:, 0] < 512).astype(int)
    np.testing.assert_array_equal(bag.instance_labels, expected)
    assert expected.sum() == 6


def test_empty_annotation_means_all_negative(tmp_path):
    path = tmp_path / "normal.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": []}))
    res = label_patches(path, COORDS, 100.0)
    assert res.labels.tolist() == [0] * 9
