import json
import os
import stat

import pytest

from tiahnm.utils.io import atomic_open, atomic_path, write_json


def test_atomic_write_and_permissions(tmp_path):
    target = tmp_path / "sub" / "out.json"
    write_json(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~mask
    assert [p.name for p in target.parent.iterdir()] == ["out.json"]


def test_failure_keeps_old_content_and_leaves_no_temp(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_open(target) as fh:
        fh.write("new, half written")
        raise RuntimeError("crash")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]
    with atomic_path(target) as tmp:
        tmp.write_text("new")
        assert target.read_text() == "old"
    assert target.read_text() == "new"


def test_remove_stale_temps_keeps_new_and_final_files(tmp_path):
    import time

    from tiahnm.utils.io import remove_stale_temps

    old = tmp_path / "a" / ".result.json.x1.tmp"
    new = tmp_path / ".last.pt.x2.tmp"
    final = tmp_path / "a" / "result.json"
    old.parent.mkdir()
    for f in (old, new, final):
        f.write_text("x")
    past = time.time() - 100
    os.utime(old, (past, past))
    os.utime(final, (past, past))
    assert remove_stale_temps(tmp_path, older_than=time.time() - 10) == 1
    assert not old.exists() and new.exists() and final.exists()
