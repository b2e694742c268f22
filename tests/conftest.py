"""Fixtures shared across test folders."""

from __future__ import annotations

import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

CIFAR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-jpg.tar"


def cifar_folder(dest: Path, classes: list[str], per_class: int) -> Path:
    """The first `per_class` test images of each of `classes` in the shared tar, as dest/<class>/NNNN.jpg."""
    taken = dict.fromkeys(classes, 0)
    with tarfile.open(CIFAR) as tar:
        for m in tar:
            parts = Path(m.name).parts
            if m.isfile() and len(parts) == 4 and parts[1] == "test" and taken.get(parts[2], per_class) < per_class:
                taken[parts[2]] += 1
                (dest / parts[2]).mkdir(parents=True, exist_ok=True)
                (dest / parts[2] / parts[3]).write_bytes(tar.extractfile(m).read())
            if all(n == per_class for n in taken.values()):
                break
    return dest


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """$CONVNEXT_CACHE in a temp folder for the whole session (and the commands it starts), so a 1x1 plan timed on a
    machine busy with tests never lands in the user's ~/.cache/convnext/plans.json for real runs to reuse."""
    cache = tmp_path_factory.mktemp("convnext-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CONVNEXT_CACHE", str(cache))
        yield cache


@pytest.fixture(scope="session")
def cifar_images() -> Callable[[Path, list[str], int], Path]:
    """`cifar_folder` (real CIFAR-10 test JPEGs into a folder per class); skips where the shared data is absent."""
    if not CIFAR.is_file():
        pytest.skip(f"{CIFAR} (the shared CIFAR-10 JPEGs) is not here")
    return cifar_folder
