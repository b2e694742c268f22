"""Schedules (pure functions of the step), weight-decay groups, and layer-wise lr decay for every model size."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torchvision

from convnext.engine.optim import build_optimizer, layer_ids, lr_at, param_groups, scaled_lr, set_lr
from convnext.model import ConvNeXt
from convnext.registry import VARIANTS, create_model


def test_warmup_then_cosine():
    kw = dict(lr=4e-3, total_steps=1000, warmup_steps=100, min_lr=1e-6, warmup_lr=0.0)
    assert lr_at(0, **kw) == 0.0
    assert lr_at(50, **kw) == pytest.approx(2e-3)
    assert lr_at(100, **kw) == pytest.approx(4e-3)
    assert lr_at(550, **kw) == pytest.approx((4e-3 + 1e-6) / 2)
    assert lr_at(1000, **kw) == pytest.approx(1e-6) and lr_at(5000, **kw) == pytest.approx(1e-6)
    after = [lr_at(s, **kw) for s in range(100, 1001)]
    assert all(a >= b for a, b in zip(after, after[1:]))
    assert lr_at(321, **kw) == lr_at(321, **kw)  # a pure function: no state between calls


def test_step_schedule_and_no_warmup():
    kw = dict(lr=0.1, total_steps=90, name="step", step_size=30, gamma=0.1)
    assert [lr_at(s, **kw) for s in (0, 29, 30, 59, 60, 89)] == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    with pytest.raises(ValueError, match="'linear' or 'step"):
        lr_at(0, lr=1.0, total_steps=10, name="poly")


def test_linear_decay_to_min_lr_at_the_budget():
    kw = dict(lr=1.0, total_steps=110, warmup_steps=10, name="linear", min_lr=0.0)
    assert [lr_at(s, **kw) for s in (0, 5, 10, 60, 110, 200)] == pytest.approx([0.0, 0.5, 1.0, 0.5, 0.0, 0.0])


def test_linear_scaling_rule():
    assert scaled_lr(4e-3, 4096, 4096) == 4e-3
    assert scaled_lr(4e-3, 1024, 4096) == pytest.approx(1e-3)


def test_no_weight_decay_on_biases_norms_layer_scale():
    model = create_model("convnext_atto", num_classes=10)
    groups = param_groups(model, weight_decay=0.05)
    names = {n: g["weight_decay"] for g in groups for n in g["param_names"]}
    params = dict(model.named_parameters())
    assert set(names) == set(params)  # every parameter exactly once
    assert sum(len(g["params"]) for g in groups) == len(params)
    for n, p in params.items():
        assert names[n] == (0.0 if p.ndim <= 1 else 0.05), n
    assert names["stages.0.blocks.0.gamma"] == 0.0 and names["stages.0.blocks.0.norm.weight"] == 0.0
    assert names["stages.0.blocks.0.pwconv1.weight"] == 0.05 and names["head.bias"] == 0.0
    v2 = dict(
        (n, g["weight_decay"]) for g in param_groups(create_model("convnextv2_atto"), 0.05) for n in g["param_names"]
    )
    assert v2["stages.0.blocks.0.grn.weight"] == 0.0


def _official_layer_id(name: str) -> int:
    """The official ConvNeXt `get_num_layer_for_convnext`, rewritten for our parameter names (depths 3,3,27,3)."""
    if name.startswith("stem."):
        return 0
    if name.startswith("stages."):
        stage = int(name.split(".")[1])
        if ".downsample." in name:
            return {1: 2, 2: 3, 3: 12}[stage]
        block = int(name.split(".")[3])
        return {0: 1, 1: 2, 2: 3 + block // 3, 3: 12}[stage]
    return 13


def _meta_model(cfg) -> ConvNeXt:
    with torch.device("meta"):
        return ConvNeXt(cfg)


def test_layer_decay_matches_official_grouping_for_depths_3_3_27_3():
    model = _meta_model(VARIANTS["convnext_base"])
    ids, n = layer_ids(model)
    assert n == 14
    for name in ids:
        assert ids[name] == _official_layer_id(name), name


@pytest.mark.parametrize("name", list(VARIANTS))
def test_layer_decay_ladder_has_no_gaps_for_every_size(name):
    model = _meta_model(VARIANTS[name])
    ids, n = layer_ids(model)
    assert sorted(set(ids.values())) == list(range(n))  # every group used: a smooth ladder, none skipped
    assert ids["stem.0.weight"] == 0 and ids["head.weight"] == n - 1
    order = [ids[k] for k, _ in model.named_parameters()]
    assert order == sorted(order)  # deeper parameters never get a smaller lr
    if VARIANTS[name].isotropic:
        assert n == VARIANTS[name].depths[0] + 2  # one group per block


def test_layer_decay_scales_and_tiny_numbers():
    model = create_model("convnext_atto", num_classes=10)  # depths 2,2,6,2 -> stem, s0, s1, s2 x2, s3, head
    ids, n = layer_ids(model)
    assert n == 7
    assert ids["stages.1.downsample.1.weight"] == ids["stages.1.blocks.0.dwconv.weight"] == 2
    assert ids["stages.2.blocks.5.dwconv.weight"] == 4 and ids["stages.3.blocks.1.gamma"] == 5
    groups = param_groups(model, 0.05, layer_decay=0.8)
    scale = {n: g["lr_scale"] for g in groups for n in g["param_names"]}
    assert scale["head.weight"] == 1.0 and scale["stem.0.weight"] == pytest.approx(0.8**6)
    opt = build_optimizer(model, "adamw", 1e-3, 0.05, layer_decay=0.8)
    set_lr(opt, 1e-3)
    lrs = {n: g["lr"] for g in opt.param_groups for n in g["param_names"]}
    assert lrs["stem.0.weight"] == pytest.approx(1e-3 * 0.8**6)


def test_layer_decay_for_other_models_follows_parameter_order():
    model = torchvision.models.resnet18(num_classes=10)
    ids, n = layer_ids(model)
    order = [ids[k] for k, _ in model.named_parameters()]
    assert order == sorted(order) and ids["conv1.weight"] == 0 and ids["fc.weight"] == n - 1
    assert ids["layer1.0.conv1.weight"] == ids["layer1.0.bn2.bias"] != ids["layer1.1.conv1.weight"]
    groups = param_groups(model, 0.05, layer_decay=0.5)
    assert min(g["lr_scale"] for g in groups) == pytest.approx(0.5 ** (n - 1))


def test_sgd_with_momentum_and_unknown_optimizer():
    model = create_model("convnext_atto", num_classes=3)
    opt = build_optimizer(model, "sgd", 0.1, 1e-4, momentum=0.9, nesterov=True)
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["momentum"] == 0.9
    x = torch.randn(2, 3, 32, 32)
    model(x).sum().backward()
    opt.step()
    assert math.isfinite(float(model.head.weight.detach().sum()))
    with pytest.raises(ValueError, match="'adamw', 'sgd' or 'muon'"):
        build_optimizer(model, "lamb", 0.1, 0.0)


def test_muon_on_block_matrices_adamw_on_the_rest_and_resume_exact():
    torch.manual_seed(0)
    model = create_model("convnext_atto", num_classes=3, depths=(1, 1, 1, 1), dims=(8, 16, 24, 32))
    opt = build_optimizer(model, "muon", 1e-2, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    in_muon = {names[id(p)] for g in opt.muon.param_groups for p in g["params"]}
    assert in_muon == {n for n, p in model.named_parameters() if p.ndim == 2 and not n.startswith("head.")}
    assert "head.weight" in {names[id(p)] for g in opt.adamw.param_groups for p in g["params"]}
    assert len(opt.param_groups) == len(opt.muon.param_groups) + len(opt.adamw.param_groups)
    set_lr(opt, 2e-2)
    assert all(g["lr"] == 2e-2 for g in opt.param_groups)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])

    def step(m, o):
        o.zero_grad()
        torch.nn.functional.cross_entropy(m(x), y).backward()
        o.step()

    step(model, opt)
    twin = create_model("convnext_atto", num_classes=3, depths=(1, 1, 1, 1), dims=(8, 16, 24, 32))
    twin.load_state_dict(model.state_dict())
    twin_opt = build_optimizer(twin, "muon", 1e-2, 0.05)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # as a checkpoint would: no shared tensors
    set_lr(twin_opt, 2e-2)
    step(model, opt)
    step(twin, twin_opt)
    for (n, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        assert torch.equal(a, b), n
