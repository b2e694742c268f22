"""The run folder: --overwrite replaces an old run only when the new one claims the folder, its sharded resume state
(`last.dcp/`, written by `--shard` runs) included."""

from __future__ import annotations

import contextlib

import pytest

from convnext.engine.run import SHARDED_STATE, RunFolder


def test_overwrite_removes_the_old_runs_sharded_state_only_when_claimed(tmp_path):
    run = tmp_path / "run"
    (run / SHARDED_STATE).mkdir(parents=True)
    (run / SHARDED_STATE / "__0_0.distcp").write_bytes(b"shard")
    (run / "last.pt").write_bytes(b"old")
    with pytest.raises(ValueError, match="already holds a run .*--overwrite"):
        RunFolder(run, overwrite=False)
    folder = RunFolder(run, overwrite=True)
    assert (run / SHARDED_STATE).is_dir()  # nothing goes before the new run claims the folder
    with contextlib.ExitStack() as held:
        folder.claim(held)
        assert not (run / SHARDED_STATE).exists() and not (run / "last.pt").exists()
