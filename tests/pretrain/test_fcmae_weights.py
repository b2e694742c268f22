"""FCMAE checkpoints load as encoders: the official layout (a SparseConvNeXtV2 of MinkowskiEngine kernels beside the
decoder, random weights built here in that layout) and ours (`convnext pretrain`'s FCMAE state dict); the decoder
and the mask token are dropped with a log line."""

from __future__ import annotations

import logging

import pytest
import torch

from convnext.pretrain.fcmae import FCMAE, FCMAEConfig
from convnext.registry import create_model
from convnext.weights import detect_layout, from_ours, load_checkpoint, read_state_dict, to_ours

SHAPE = {"depths": (2, 1, 1, 1), "dims": (8, 16, 32, 64)}


def _encoder(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    fcmae = FCMAE(create_model("convnextv2_atto", num_classes=0, **SHAPE), FCMAEConfig(decoder_dim=16))
    with torch.no_grad():
        for p in fcmae.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return fcmae


def official_sparse_checkpoint(fcmae: FCMAE) -> dict:
    """`fcmae` in the layout of the official `*_fcmae.pt` files: {"model": {...}} with `encoder.` holding a
    SparseConvNeXtV2 (depthwise kernels (k*k, C), downsampling kernels (k*k, C_in, C_out), biases and GRN (1, C),
    `norm.ln.*`, `pwconv1.linear.*`; the stem a dense conv and LayerNorm), and the dense decoder beside it."""
    dense = from_ours(fcmae.encoder.state_dict(), "official")
    sparse = {}
    for key, v in dense.items():
        parts = key.split(".")
        if key.startswith("downsample_layers.") and parts[1] != "0":  # MinkowskiLayerNorm + MinkowskiConvolution
            if parts[2] == "0":
                key = ".".join(parts[:3] + ["ln"] + parts[3:])
            elif parts[-1] == "weight":  # (out, in, k, k) -> (k*k, in, out): the official remap, undone
                o, i, k, _ = v.shape
                key, v = key.replace(".weight", ".kernel"), v.transpose(3, 2).reshape(o, i, k * k).permute(2, 1, 0)
            else:
                v = v.reshape(1, -1)
        elif ".dwconv." in key:
            if parts[-1] == "weight":  # (C, 1, k, k) -> (k*k, C)
                c, _, k, _ = v.shape
                key, v = key.replace(".weight", ".kernel"), v.transpose(3, 2).reshape(c, k * k).permute(1, 0)
            else:
                v = v.reshape(1, -1)
        elif ".norm." in key and key.startswith("stages."):
            key = key.replace(".norm.", ".norm.ln.")
        elif ".pwconv" in key:
            key = key.replace(".weight", ".linear.weight").replace(".bias", ".linear.bias")
        elif ".grn." in key:
            v = v.reshape(1, -1)
        sparse["encoder." + key] = v.contiguous()
    d = fcmae.cfg.decoder_dim
    sparse |= {
        "mask_token": fcmae.mask_token.detach().clone(),
        "proj.weight": fcmae.proj.weight.detach().clone(),
        "proj.bias": fcmae.proj.bias.detach().clone(),
        "pred.weight": fcmae.pred.weight.detach().clone(),
        "pred.bias": fcmae.pred.bias.detach().clone(),
        "decoder.0.dwconv.weight": torch.randn(d, 1, 7, 7),
        "decoder.0.grn.gamma": torch.zeros(1, 1, 1, 4 * d),
    }
    return {"model": sparse, "epoch": 799}


def test_official_fcmae_checkpoint_loads_into_a_classifier(tmp_path, caplog):
    fcmae = _encoder()
    path = tmp_path / "convnextv2_atto_1k_224_fcmae.pt"
    torch.save(official_sparse_checkpoint(fcmae), path)
    assert detect_layout(read_state_dict(path)) == "fcmae"
    model = create_model("convnextv2_atto", num_classes=5, **SHAPE)
    with caplog.at_level(logging.INFO, logger="convnext.weights.io"), pytest.warns(UserWarning, match="its fresh"):
        load_checkpoint(model, path)
    line = next(r.getMessage() for r in caplog.records if "FCMAE checkpoint" in r.getMessage())
    assert "dropped the decoder (7 tensors: decoder, mask_token, pred, proj)" in line
    for k, v in fcmae.encoder.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.eval().forward_features(x), fcmae.encoder.eval().forward_features(x))


def test_our_fcmae_state_dict_loads_as_encoder_and_converts(tmp_path):
    fcmae = _encoder(seed=1)
    path = tmp_path / "last.pt"
    torch.save({"model": fcmae.state_dict(), "step": 3}, path)
    sd = read_state_dict(path)
    assert detect_layout(sd) == "fcmae"
    ours = to_ours(sd, "fcmae")
    assert set(ours) == set(fcmae.encoder.state_dict())
    with pytest.warns(UserWarning, match=r"no \['norm.bias', 'norm.weight'\]"):
        backbone = create_model("convnextv2_atto", num_classes=0, checkpoint=path, **SHAPE)
    assert torch.equal(backbone.stem[0].weight, fcmae.encoder.stem[0].weight)
    assert torch.equal(backbone.norm.weight, torch.ones(64))  # the pre-training has no final norm: a fresh one
