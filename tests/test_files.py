import stat

import pytest

from movierec.files import atomic_path


def test_atomic_path_replaces_the_file_only_when_the_write_succeeds(tmp_path):
    out = tmp_path / "sub" / "model.bin"
    with atomic_path(out) as tmp:
        assert tmp.parent == out.parent and tmp != out
        tmp.write_bytes(b"first")
    assert out.read_bytes() == b"first"
    assert stat.S_IMODE(out.stat().st_mode) == 0o644

    with pytest.raises(RuntimeError, match="crashed"), atomic_path(out) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("crashed")
    assert out.read_bytes() == b"first"
    assert [p.name for p in out.parent.iterdir()] == ["model.bin"]
