"""The run folder under faults: --overwrite loses nothing when set-up fails, bad values are refused before the
folder is touched, a second run on the same folder is refused, temp files of killed saves are cleared."""

from __future__ import annotations

import fcntl
import os
import threading

import pytest
import torch

from convnext.engine.run import RunFolder, run_lock
from convnext.train import auto_recipe, fit


def test_overwrite_keeps_the_old_run_when_the_data_is_missing(image_folder, tiny_config, tmp_path):
    out = tmp_path / "run"
    fit(tiny_config(image_folder, out, epochs=1))
    before = {f.name: f.read_bytes() for f in out.iterdir() if f.is_file() and f.name != ".lock"}
    with pytest.raises(Exception, match="missing"):
        fit(tiny_config(tmp_path / "missing", out, overwrite=True))
    after = {f.name: f.read_bytes() for f in out.iterdir() if f.is_file() and f.name != ".lock"}
    assert after == before and "best.pt" in after


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [("epochs", 0, "epochs must be >= 1"), ("epochs", -3, "epochs must be >= 1"),
     ("budget_min", -1.0, "budget_min must be > 0"), ("data.img_size", 0, "img_size must be >= 1")],
)  # fmt: skip
def test_unusable_values_are_refused_before_the_folder_is_made(
    image_folder, tiny_config, tmp_path, field, value, message
):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=message):
        fit(tiny_config(image_folder, out, **{field: value}))
    assert not out.exists()


def test_output_that_is_a_file_is_refused(image_folder, tiny_config, tmp_path):
    target = tmp_path / "file.txt"
    target.write_text("keep")
    with pytest.raises(NotADirectoryError, match="file.txt"):
        fit(tiny_config(image_folder, target))
    with pytest.raises(NotADirectoryError, match="below a file"):
        fit(tiny_config(image_folder, target / "run"))
    assert target.read_text() == "keep"


def test_a_second_run_on_a_locked_folder_is_refused(image_folder, tiny_config, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    with open(out / ".lock", "a+") as f:  # another process's run holds the folder
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        f.write("12345")
        f.flush()
        pid = os.fork()
        if pid == 0:  # flock locks are per open file: a child that opens it again competes like another run
            try:
                with run_lock(out):
                    os._exit(1)
            except RuntimeError as e:
                os._exit(0 if "another run is writing" in str(e) and "12345" in str(e) else 2)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    assert not (out / "config.json").exists()


def test_the_ranks_of_one_run_checking_the_folder_at_once_do_not_refuse_each_other(tmp_path):
    """The ranks of a DDP run each check the folder when they start; one rank's check must not read as a run."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "last.pt").write_bytes(b"")  # a killed run's folder, its lock file naming a dead pid
    with open(out / ".lock", "a+") as peer:
        peer.write("12345")
        peer.flush()
        fcntl.flock(peer, fcntl.LOCK_SH | fcntl.LOCK_NB)  # the peer rank, mid-check
        RunFolder(out, resume=True)  # this rank's check passes
        threading.Timer(0.2, fcntl.flock, (peer, fcntl.LOCK_UN)).start()  # the peer's check ends
        with run_lock(out):  # and the claim, which waited for it, holds the folder
            assert (out / ".lock").read_text() == str(os.getpid())


def test_temp_files_of_killed_saves_are_cleared(image_folder, tiny_config, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    stale = out / ".last.pt.abc123.tmp"
    stale.write_bytes(b"half a checkpoint")
    fit(tiny_config(image_folder, out, epochs=1))
    assert not stale.exists() and (out / "last.pt").is_file()


@pytest.mark.parametrize(("kwargs", "message"), [({"epochs": 0}, "--epochs"), ({"budget_min": -1}, "--budget-min"),
                                                 ({"img_size": 0}, "--img-size")])  # fmt: skip
def test_the_auto_recipe_refuses_unusable_values(image_folder, kwargs, message):
    with pytest.raises(ValueError, match=message):
        auto_recipe(str(image_folder), **kwargs)


@pytest.mark.parametrize(
    "argv",
    [["train", "--epochs", "0"], ["train", "--budget-min", "-1"], ["train", "--img-size", "0"],
     ["predict", "convnext_atto", "x.png", "--topk", "0"], ["bench", "--batch", "0"]],
)  # fmt: skip
def test_cli_refuses_non_positive_counts_in_one_line(argv, tmp_path, capsys):
    from convnext.cli import build_parser

    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([*argv, "--output", str(tmp_path / "run")] if argv[0] == "train" else argv)
    assert e.value.code == 2 and not (tmp_path / "run").exists()
    assert f"argument {argv[-2]}: must be " in capsys.readouterr().err


def test_a_full_disk_names_the_file_and_keeps_the_previous_one(tmp_path, monkeypatch):
    import errno

    import torch

    from convnext.engine import checkpoint

    target = tmp_path / "last.pt"
    checkpoint.save_atomic({"step": 1}, target)

    def full_disk(obj, f):  # what the kernel answers when the disk fills during the write
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match=f"cannot write {target}: No space left on device; the previous file is kept"):
        checkpoint.save_atomic({"step": 2}, target)
    monkeypatch.undo()
    assert checkpoint.load(target)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_an_unknown_model_option_is_one_line_and_writes_nothing(image_folder, tmp_path, capsys):
    from convnext.cli import main

    out = tmp_path / "run"
    argv = ["train", "--preset", "demo", "--data", str(image_folder), "--output", str(out), "--epochs", "1",
            "--model.kwargs.foo", "1"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "unknown option(s) ['foo']" in err and "Traceback" not in err
    assert not (out / "config.json").exists() and not (out / "last.pt").exists()


def test_a_run_stopped_before_its_first_checkpoint_starts_again(image_folder, tiny_config, tmp_path, caplog):
    """What an early Ctrl-C or a failure in set-up leaves (config.json and the lock, no last.pt) is started again
    by the same command, and by --resume, each said in one line."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / ".lock").write_text("999")
    with caplog.at_level("INFO", logger="convnext.train"):
        result = fit(tiny_config(image_folder, out, epochs=1))
    assert "stopped before its first checkpoint (config.json): starting it again" in caplog.text
    assert result["epochs"] == 1 and (out / "last.pt").is_file()

    again = tmp_path / "again"
    again.mkdir()
    (again / "config.json").write_text("{}")
    (again / ".lock").write_text("")
    caplog.clear()
    with caplog.at_level("INFO", logger="convnext.train"):
        fit(tiny_config(image_folder, again, epochs=1, resume=str(again)))
    assert "--resume starts it again from the beginning" in caplog.text and (again / "last.pt").is_file()


def test_a_busy_folder_is_refused_before_the_data_is_read(image_folder, tiny_config, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    with open(out / ".lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        pid = os.fork()
        if pid == 0:  # another process: the data folder is missing, but the lock is what it must hear about first
            try:
                fit(tiny_config(tmp_path / "missing", out, overwrite=True))
                os._exit(1)
            except RuntimeError as e:
                os._exit(0 if "another run is writing" in str(e) else 2)
            except Exception:
                os._exit(3)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_best_pt_holds_the_weights_not_the_optimizer(image_folder, tiny_config, tmp_path):
    from convnext.engine.checkpoint import load

    out = tmp_path / "run"
    fit(tiny_config(image_folder, out, epochs=1, ema=True, ema_decay=0.9))
    best, last = load(out / "best.pt"), load(out / "last.pt")
    assert set(best) == {"model", "ema", "config", "step", "epoch", "best"} and "optimizer" in last
    assert all(torch.equal(v, last["model"][k]) for k, v in best["model"].items())
    assert (out / "best.pt").stat().st_size < (out / "last.pt").stat().st_size


@pytest.mark.parametrize(
    ("overrides", "message"),
    [({"data.img_size": 7}, "smaller than the model's total stride 16"),
     ({"data.img_size": 100000}, "GiB for activations"),
     ({"model.drop_path_rate": 1.5}, r"model.drop_path_rate must be in \[0, 1\), got 1.5"),
     ({"data.label_smoothing": -0.1}, r"data.label_smoothing must be in \[0, 1\)"),
     ({"optim.lr": -1e-3}, "optim.lr must be a positive number, got -0.001")],
)  # fmt: skip
def test_sizes_and_rates_no_run_can_use_are_refused_before_any_work(image_folder, tiny_config, tmp_path, overrides,
                                                                     message):  # fmt: skip
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=message):
        fit(tiny_config(image_folder, out, **overrides))
    assert not out.exists()
