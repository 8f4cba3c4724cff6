"""bench.run's command line: a mistyped section is an error, not a run that measures nothing."""

from __future__ import annotations

import pytest

from bench import run


def test_unknown_section_or_profile_is_refused_before_anything_is_written(tmp_path, capsys):
    for argv in (["--only", "tune"], ["--only", "local", "--profiles", "fast"]):
        with pytest.raises(SystemExit) as exit_info:
            run.main([*argv, "--output", str(tmp_path / "bench")])
        assert exit_info.value.code == 2
        assert "invalid choice" in capsys.readouterr().err
    assert not (tmp_path / "bench").exists()
