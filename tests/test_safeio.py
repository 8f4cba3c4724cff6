"""safeio's one atomic write: the old file or the whole new one, and no temporary left."""

from __future__ import annotations

import pytest

from lungxray import safeio


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "state.json"
    safeio.write_text_atomic(target, '{"a": 1}')
    assert target.read_text() == '{"a": 1}'

    def half_then_fail(out):
        out.write(b'{"a": 2')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        safeio.replace_atomically(target, half_then_fail)
    assert target.read_text() == '{"a": 1}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]
    safeio.write_text_atomic(target, '{"a": 3}', fsync=True)
    assert target.read_text() == '{"a": 3}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]
