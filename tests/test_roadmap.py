"""Roadmap steps: order, step-to-step changes, costs against the paper, 00 == ResNet-50, 12 == ConvNeXt-T."""

from dataclasses import fields

import pytest
import torch
import torchvision

from convnext.flops import count_gmacs, count_params
from convnext.registry import create_model, list_models
from convnext.roadmap import PAPER, STEP_CONFIGS, RoadmapNet, step_index

NAMES = list(STEP_CONFIGS)

# What each step changes in the config, relative to the previous one (the paper's Figure 2, top to bottom).
CHANGES = {
    1: set(),  # the training recipe only
    2: {"depths"},
    3: {"stem"},
    4: {"depthwise", "stem_dim", "dims"},
    5: {"block"},
    6: {"dw_first"},
    7: {"kernel_size"},
    8: {"act"},
    9: {"acts"},
    10: {"norms"},
    11: {"norm"},
    12: {"downsample", "layer_scale_init"},
}


def test_list_models_returns_the_thirteen_steps_in_order():
    names = list_models("roadmap_*")
    assert names == NAMES and len(names) == 13
    assert [step_index(n) for n in names] == list(range(13))
    assert names[0] == "roadmap_00_resnet50" and names[-1] == "roadmap_12_convnext_tiny"


@pytest.mark.parametrize("i", sorted(CHANGES))
def test_each_step_changes_exactly_the_papers_setting(i):
    before, after = STEP_CONFIGS[NAMES[i - 1]], STEP_CONFIGS[NAMES[i]]
    changed = {f.name for f in fields(before) if getattr(before, f.name) != getattr(after, f.name)}
    assert changed == CHANGES[i]


def test_step_01_is_step_00s_model():
    assert STEP_CONFIGS[NAMES[0]] == STEP_CONFIGS[NAMES[1]]


@pytest.mark.parametrize("name", NAMES)
def test_gmacs_at_224_within_5_percent_of_the_paper(name):
    with torch.device("meta"):
        model = create_model(name)
        gmacs = count_gmacs(model)
    ref = PAPER[name][1]
    tol = 0.01 if name in (NAMES[0], NAMES[-1]) else 0.05  # the end points are exact in the paper
    assert gmacs == pytest.approx(ref, rel=tol)


def test_step_00_is_torchvisions_resnet50():
    ours, theirs = create_model(NAMES[0]).eval(), torchvision.models.resnet50().eval()
    assert count_params(ours) == count_params(theirs) == 25_557_032
    with torch.no_grad():  # give torchvision's BN non-trivial statistics so the comparison means something
        for m in theirs.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1), m.running_var.uniform_(0.5, 1.5), m.weight.uniform_(0.5, 1.5)
    ours.load_state_dict(_from_torchvision(theirs.state_dict()))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-5)


def _from_torchvision(sd: dict) -> dict:
    """torchvision ResNet names -> roadmap names."""
    out = {}
    for k, v in sd.items():
        k = (
            k.replace("conv1.", "stem.conv.", 1).replace("bn1.", "stem.norm.", 1)
            if k.startswith(("conv1", "bn1"))
            else k
        )
        k = k.replace("fc.", "head.")
        if k.startswith("layer"):
            stage, block, rest = k[5:].split(".", 2)
            for n in (1, 2, 3):
                rest = rest.replace(f"conv{n}.", f"convs.{n - 1}.conv.").replace(f"bn{n}.", f"convs.{n - 1}.norm.")
            rest = rest.replace("downsample.0.", "shortcut.conv.").replace("downsample.1.", "shortcut.norm.")
            k = f"stages.{int(stage) - 1}.blocks.{block}.{rest}"
        out[k] = v
    return out


def test_step_12_is_convnext_tiny():
    ref = create_model("convnext_tiny").eval()
    step = create_model(NAMES[-1]).eval()
    assert type(step) is type(ref)
    assert [(n, p.shape) for n, p in step.named_parameters()] == [(n, p.shape) for n, p in ref.named_parameters()]
    assert count_params(step) == 28_589_128
    with torch.no_grad():  # non-trivial layer scale so every block matters
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    step.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(step(x), ref(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_every_step_runs_forward_and_backward_at_cifar_size(name):
    model = create_model(name, num_classes=10, patch_size=2, drop_path_rate=0.1, layer_scale_init=1e-6)
    out = model(torch.randn(2, 3, 32, 32))
    out.logsumexp(dim=1).sum().backward()
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("k", [3, 5, 7, 9, 11])
def test_kernel_size_override(k):
    with torch.device("meta"):
        model = create_model("roadmap_07_kernel7", kernel_size=k)
    assert model.stages[0].blocks[0].convs[0].conv.kernel_size == (k, k)


@pytest.mark.parametrize("patch_size, side", [(4, 1), (2, 2), (1, 4)])
def test_stem_adapts_to_32px(patch_size, side):
    for name in (NAMES[0], NAMES[3], NAMES[-1]):
        with torch.device("meta"):
            model = create_model(name, patch_size=patch_size, in_chans=1).eval()
            feats = model.forward_features(torch.empty(1, 1, 32, 32))
        assert feats.shape[-2:] == (side, side)


def test_bad_overrides_fail_clearly():
    with pytest.raises(TypeError, match="unknown option"):
        create_model(NAMES[0], widht=3)
    with pytest.raises(ValueError, match="patch_size"):
        create_model(NAMES[0], patch_size=3)
    with pytest.raises(ValueError, match="ConvNeXt"):
        create_model(NAMES[0], downsample="separate")
    with pytest.raises(ValueError, match="downsamples inside blocks"):
        RoadmapNet(STEP_CONFIGS[NAMES[-1]])
