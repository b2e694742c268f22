"""The timed 1x1 plan is kept per machine and shape in $CONVNEXT_CACHE/plans.json and read back by later runs; a
corrupt file is set aside with one warning and rewritten. Every test here points the cache at its own tmp folder."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from convnext.fast import cached_plan, plan_cache_path, plan_from_rows, plan_to_rows
from convnext.fast.plan import plan_key
from convnext.model import ConvNeXt, ConvNeXtConfig

TINY = ConvNeXtConfig(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64), num_classes=5, patch_size=2)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """The plan cache in tmp_path: no test writes to the real ~/.cache/convnext."""
    monkeypatch.setenv("CONVNEXT_CACHE", str(tmp_path))
    return tmp_path / "plans.json"


def _model(**kw) -> ConvNeXt:
    return ConvNeXt(TINY.with_(**kw))


def test_the_cache_lives_under_convnext_cache(cache):
    assert plan_cache_path() == cache


def test_key_names_the_shape_dtype_widths_and_machine():
    model = _model()
    key = plan_key(model, (2, 3, 32, 32), torch.float32)
    assert key == plan_key(_model(), (2, 3, 32, 32), torch.float32)
    others = {
        plan_key(model, (4, 3, 32, 32), torch.float32),  # batch
        plan_key(model, (2, 3, 64, 64), torch.float32),  # image size
        plan_key(model, (2, 3, 32, 32), torch.bfloat16),
        plan_key(_model(dims=(8, 16, 32, 48)), (2, 3, 32, 32), torch.float32),
        plan_key(_model(patch_size=4), (2, 3, 32, 32), torch.float32),
    }
    assert key not in others and len(others) == 5
    fields = json.loads(key)
    assert fields["torch"] == torch.__version__ and fields["threads"] == torch.get_num_threads() and fields["cpu"]


def test_timed_once_then_read_back(cache):
    model, x = _model(), torch.randn(2, 3, 32, 32)
    plan, source = cached_plan(model, x, torch.float32)
    assert source.startswith("timed now") and plan
    stored = json.loads(cache.read_text())["plans"]
    assert list(stored) == [plan_key(model, tuple(x.shape), torch.float32)]
    # every choice flipped in the file: a later call runs what the file says, it does not time again
    key = next(iter(stored))
    stored[key] = [[*row[:5], not row[5]] for row in stored[key]]
    cache.write_text(json.dumps({"plans": stored}))
    again, source = cached_plan(model, x, torch.float32)
    assert source == f"kept in {cache}"
    assert again == {k: not v for k, v in plan.items()}
    # another shape is another entry; the first stays as it was
    cached_plan(model, torch.randn(3, 3, 32, 32), torch.float32)
    stored = json.loads(cache.read_text())["plans"]
    assert len(stored) == 2 and plan_from_rows(stored[key]) == again
    assert sorted(p.name for p in cache.parent.iterdir() if p.name.startswith("plans")) == ["plans.json", "plans.lock"]


@pytest.mark.parametrize(
    "text", ["{not json", '{"plans": [1, 2]}', '{"plans": {"k": [["conv", 1, 2, 3, "nodtype", 1]]}}']
)
def test_a_corrupt_file_is_ignored_with_one_warning_and_rewritten(cache, caplog, text):
    cache.write_text(text)
    model, x = _model(), torch.randn(2, 3, 32, 32)
    with caplog.at_level(logging.WARNING, logger="convnext.fast.plan"):
        plan, source = cached_plan(model, x, torch.float32)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert (
        len(warnings) == 1 and "cannot be read" in warnings[0].getMessage() and str(cache) in warnings[0].getMessage()
    )
    assert source.startswith("timed now")
    stored = json.loads(cache.read_text())["plans"]
    assert stored == {plan_key(model, tuple(x.shape), torch.float32): json.loads(json.dumps(plan_to_rows(plan)))}
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="convnext.fast.plan"):
        assert cached_plan(model, x, torch.float32) == (plan, f"kept in {cache}")
    assert not caplog.records
