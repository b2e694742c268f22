"""The command line's habits: verbosity flags on either side of the command, and one line for an error raised
inside a DataLoader worker."""

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from convnext.cli import main, worker_error
from convnext.data.decode import BadImageError


def test_verbosity_flags_before_or_after_the_command(capsys):
    assert main(["list", "-v", "convnext_at*"]) == 0 and "convnext_atto" in capsys.readouterr().out
    assert main(["-q", "list", "convnext_at*"]) == 0 and "convnext_atto" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["list", "-v", "-q"])
    assert "exclude each other" in capsys.readouterr().err


class _Truncated(Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> torch.Tensor:
        raise BadImageError("cannot read image /data/train/cat/7.jpg: unreadable or truncated image")


def test_an_error_in_a_loader_worker_is_its_own_line():
    with pytest.raises(BadImageError) as caught:
        next(iter(DataLoader(_Truncated(), num_workers=1)))
    assert "Original Traceback" in str(caught.value)  # what torch hands the main process
    assert worker_error(str(caught.value)) == "cannot read image /data/train/cat/7.jpg: unreadable or truncated image"
    assert worker_error("plain message: kept") == "plain message: kept"


def test_system_says_what_the_fast_path_runs_on(capsys):
    import json

    from convnext.fast import kernels

    assert main(["system", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["torch"] == torch.__version__ and info["c_kernels"] == kernels.status()
    assert info["threads"] == torch.get_num_threads() and isinstance(info["cuda"], list)
    assert main(["system"]) == 0 and "c_kernels" in capsys.readouterr().out


def test_help_loads_no_torch():
    """`convnext --help` answers without importing torch (seconds of import on a small machine)."""
    import subprocess
    import sys

    code = "import sys; from convnext.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
    import convnext

    assert convnext.create_model("convnext_atto").cfg.dims[0] == 40  # the lazy names still work
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        convnext.nope  # noqa: B018
