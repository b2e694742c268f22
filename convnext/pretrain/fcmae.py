"""FCMAE, the masked-image pre-training of ConvNeXt V2 ("ConvNeXt V2", Woo et al. 2023, section 3), in plain PyTorch.

Smallest part first: random_mask -> upsample_mask -> patchify -> masked_block -> masked_features -> FCMAE.

Masking. An image of H x W is cut into patches as large as the encoder's total stride (stem x 2^3: 32 px for the
4x4 stem, a 7x7 grid at 224 px; 16 px for a 2x2 stem, a 4x4 grid at 64 px); `mask_ratio` of them (0.6) are
removed at random, the same number in every image. The mask lives on that grid, (B, h, w) bool, True = removed,
and is repeated (nearest) to each stage's resolution. Any input size the patches tile works (non-square too); any
other is refused with a ValueError naming the nearest sizes that do (`mask_grid`), never cropped or padded.

The sparse encoder, emulated with dense ops. The official code runs the encoder as a sparse network
(MinkowskiEngine): removed patches do not exist, so no convolution reads them. Here the maps stay dense, with every
removed position held at zero (zeroed after the stem and after each downsampling layer, kept zero by every block,
whose residual add scatters into the visible places only), so that a 7x7 depthwise convolution at a visible
position sums over visible neighbours only, exactly as a sparse convolution whose absent inputs contribute
nothing. The per-position rest of a block (LayerNorm, the MLP, GRN) runs on the
visible positions alone, gathered into rows (B, n_visible, C): GRN's spatial L2 norm is then the visible-only norm
of the sparse network by construction, and the MLP, nine tenths of the work, costs the visible share (40%) of a
dense one (2.3x faster training than zeroing full dense maps, measured on atto at 64 px on 2 cores).
One difference from the official sparse GRN is kept on purpose: it pooled the norm over the whole batch (its
features are one list of points); here it is per image, as the dense ConvNeXt V2 that is fine-tuned afterwards
computes it.

The decoder: a 1x1 projection to `decoder_dim`, a learned mask token in the removed cells, `decoder_depth` ConvNeXt
V2 blocks on the h x w grid, and a 1x1 conv predicting each cell's patch (stride^2 x 3 pixels). The loss: the
mean squared error of those pixels, normalised per patch (mean and variance over the patch's own pixels,
`norm_pix_loss`), over the removed patches only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from convnext.fast import DepthwiseConv, ResponseNorm
from convnext.model import Block, ConvNeXt, ConvNeXtConfig, init_weights


def visible_count(grid: tuple[int, int], ratio: float) -> int:
    """Patches kept per image: int(h * w * (1 - ratio)), as the official code counts them."""
    return int(grid[0] * grid[1] * (1 - ratio))


def mask_grid(height: int, width: int, stride: int, ratio: float) -> tuple[int, int]:
    """The (h, w) grid of `stride`-pixel patches on an H x W input; a ValueError naming the problem when the
    patches do not tile the input or the ratio would leave no patch visible."""
    if height % stride or width % stride:
        near = sorted({max(stride, height // stride * stride), (height // stride + 1) * stride})
        raise ValueError(
            f"a {height}x{width} input is not tiled by the {stride}px masking patches (the encoder's total stride); "
            f"use a multiple of {stride}, e.g. {' or '.join(map(str, near))}"
        )
    grid = (height // stride, width // stride)
    keep = visible_count(grid, ratio)
    if keep < 1:
        raise ValueError(
            f"a {grid[0]}x{grid[1]} grid of {stride}px patches at mask ratio {ratio} keeps {keep} of "
            f"{grid[0] * grid[1]}: nothing would be seen; use a larger input or a smaller stem (model.patch_size)"
        )
    return grid


def random_mask(
    batch: int, grid: tuple[int, int], ratio: float, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(batch, h, w) bool, True = removed; each image keeps exactly `visible_count(grid, ratio)` patches, chosen
    uniformly at random (from `generator`, on the CPU)."""
    h, w = grid
    keep = visible_count(grid, ratio)
    noise = torch.rand(batch, h * w, generator=generator)
    rank = noise.argsort(dim=1).argsort(dim=1)  # each patch's place in its image's random order
    return (rank >= keep).view(batch, h, w)


def upsample_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, h, w) grid mask -> (B, 1, H, W), each cell repeated to an (H/h) x (W/w) block (nearest)."""
    h, w = mask.shape[-2:]
    return mask.repeat_interleave(size[0] // h, dim=1).repeat_interleave(size[1] // w, dim=2)[:, None]


def patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, h*p, w*p) -> (B, h*w, p*p*C): each patch's pixels, row by row, channels last (the official order)."""
    b, c, hp, wp = imgs.shape
    x = imgs.reshape(b, c, hp // p, p, wp // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (hp // p) * (wp // p), p * p * c)


def unpatchify(x: torch.Tensor, p: int, grid: tuple[int, int], chans: int = 3) -> torch.Tensor:
    """`patchify` undone: (B, h*w, p*p*C) -> (B, C, h*p, w*p)."""
    h, w = grid
    x = x.reshape(x.shape[0], h, w, p, p, chans)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(x.shape[0], chans, h * p, w * p)


def masked_block(block: Block, x: torch.Tensor, rows: torch.Tensor, fast: bool = False) -> torch.Tensor:
    """A ConvNeXt block on a map zeroed at removed positions, (B, C, H, W) -> the same, still zero there.

    rows: (B, n) the flat indices (i * W + j) of each image's visible positions, the same count n in every image.
    fast: the depthwise convolution through `convnext.fast.DepthwiseConv` (its C-kernel weight gradient) when
    training in float32 on the CPU, and GRN through `convnext.fast.ResponseNorm` on the CPU.
    """
    b, c, h, w = x.shape
    cpu_fp32_training = torch.is_grad_enabled() and x.device.type == "cpu" and x.dtype == torch.float32
    if fast and cpu_fp32_training and not torch.is_autocast_enabled("cpu"):
        y = DepthwiseConv.apply(x, block.dwconv.weight, block.dwconv.bias)
    else:
        y = block.dwconv(x)
    index = rows[:, :, None].expand(-1, -1, c)  # (B, n, C)
    y = y.permute(0, 2, 3, 1).reshape(b, h * w, c).gather(1, index)  # (B, n, C): the visible positions only
    y = block.act(block.pwconv1(block.norm(y)))  # (B, n, 4C)
    if fast and x.device.type == "cpu" and not isinstance(block.grn, nn.Identity):  # GRN over the visible rows
        y = ResponseNorm.apply(y, block.grn.weight, block.grn.bias, block.grn.eps)
    else:
        y = block.grn(y[:, :, None]).squeeze(2)  # GRN's norm over (n, 1): over the visible positions
    y = block.pwconv2(y)
    if block.gamma is not None:
        y = y * block.gamma
    y = block.drop_path(y)
    out = x.permute(0, 2, 3, 1).reshape(b, h * w, c).scatter_add(1, index, y)  # removed positions stay zero
    return out.view(b, h, w, c).permute(0, 3, 1, 2)  # (B, C, H, W), channels-last


def masked_features(encoder: ConvNeXt, x: torch.Tensor, mask: torch.Tensor, fast: bool = False) -> torch.Tensor:
    """The encoder's last map (B, C, h, w) computed as the sparse network would: zero at removed cells, and at
    visible cells what the encoder computes on an input whose removed patches are absent.

    x: (B, in_chans, H, W) with H, W the grid times the encoder's stride; mask: (B, h, w) bool, True = removed,
    with the same number of visible cells in every image."""
    x = encoder.stem(x.contiguous(memory_format=torch.channels_last))
    for stage in encoder.stages:
        x = stage.downsample(x)
        keep = ~upsample_mask(mask, x.shape[-2:])  # (B, 1, H, W)
        x = (x * keep).contiguous(memory_format=torch.channels_last)
        flat = keep.flatten(1)
        rows = flat.nonzero()[:, 1].view(x.shape[0], -1)  # (B, n): row-major, so grouped by image
        for block in stage.blocks:
            x = masked_block(block, x, rows, fast)
    return x


@dataclass(frozen=True)
class FCMAEConfig:
    mask_ratio: float = 0.6  # share of the patches removed (the paper's 0.6)
    decoder_dim: int = 512  # the paper's 512 for every size
    decoder_depth: int = 1  # ConvNeXt V2 blocks in the decoder (the paper's 1)
    norm_pix_loss: bool = True  # targets normalised per patch (the official recipe's --norm_pix_loss)


class FCMAE(nn.Module):
    """A ConvNeXt encoder, masked as above, with the FCMAE decoder and loss.

    The encoder's head and final norm are removed (the pre-training never trains them), so its state dict
    (`encoder.*`) is what a classifier or a detection backbone loads. `fast`: see `masked_block`.
    """

    def __init__(self, encoder: ConvNeXt, cfg: FCMAEConfig | None = None, fast: bool = False):
        super().__init__()
        cfg = cfg or FCMAEConfig()
        if not isinstance(encoder, ConvNeXt):
            raise ValueError(f"FCMAE needs a ConvNeXt encoder, not {type(encoder).__name__}")
        if not 0 < cfg.mask_ratio < 1:
            raise ValueError(f"mask_ratio must be in (0, 1), got {cfg.mask_ratio}")
        encoder.reset_classifier(0)
        encoder.norm = nn.Identity()
        self.encoder, self.cfg, self.fast = encoder, cfg, fast
        self.stride = encoder.feature_info[-1]["reduction"]  # the patch side: stem x 2^(stages - 1)
        self.in_chans = encoder.cfg.in_chans
        d = cfg.decoder_dim
        block_cfg = ConvNeXtConfig(grn=True, layer_scale_init=0.0)  # a V2 block, as the official decoder
        self.proj = nn.Conv2d(encoder.num_features, d, 1)
        self.mask_token = nn.Parameter(torch.zeros(1, d, 1, 1))
        self.decoder = nn.Sequential(*(Block(d, block_cfg) for _ in range(cfg.decoder_depth)))
        self.pred = nn.Conv2d(d, self.stride**2 * self.in_chans, 1)
        for m in (self.proj, self.decoder, self.pred):
            m.apply(init_weights)
        nn.init.normal_(self.mask_token, std=0.02)

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """The mask grid of an H x W input (`mask_grid`)."""
        return mask_grid(height, width, self.stride, self.cfg.mask_ratio)

    def forward_encoder(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return masked_features(self.encoder, x, mask, self.fast)

    def forward_decoder(self, z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Encoder map (B, C, h, w) -> predicted pixels per cell (B, stride^2 * in_chans, h, w)."""
        z = self.proj(z)
        removed = mask[:, None].to(z.dtype)  # (B, 1, h, w)
        z = z * (1 - removed) + self.mask_token.to(z.dtype) * removed
        return self.pred(self.decoder(z))

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Per-image loss (B,): the mean over removed patches of each patch's mean squared pixel error."""
        target = patchify(imgs.float(), self.stride)  # (B, L, p*p*C)
        if self.cfg.norm_pix_loss:
            mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        pred = pred.float().flatten(2).transpose(1, 2)  # (B, L, p*p*C)
        per_patch = (pred - target).pow(2).mean(dim=-1)  # (B, L)
        removed = mask.flatten(1).to(per_patch.dtype)
        return (per_patch * removed).sum(dim=1) / removed.sum(dim=1)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, per-cell predictions (B, stride^2 * C, h, w), mask (B, h, w)); without `mask`, a random one at
        `cfg.mask_ratio` from torch's global random stream. The loss is the batch mean of the per-image losses,
        which every image weighs equally (each has the same number of removed patches)."""
        grid = self.grid(*x.shape[-2:])
        if mask is None:
            mask = random_mask(x.shape[0], grid, self.cfg.mask_ratio)
        mask = mask.to(x.device)
        if tuple(mask.shape[1:]) != grid:
            raise ValueError(f"mask of shape {tuple(mask.shape)} for a {grid[0]}x{grid[1]} grid")
        pred = self.forward_decoder(self.forward_encoder(x, mask), mask)
        return self.forward_loss(x, pred, mask).mean(), pred, mask

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The input with its removed patches replaced by the predictions, in the input's units (B, C, H, W).
        With `norm_pix_loss` the predictions are per-patch normalised; each is put back at its own patch's mean and
        spread (the usual way to show MAE reconstructions)."""
        p, grid, mask = self.stride, tuple(mask.shape[1:]), mask.to(x.device)
        pred = self.forward_decoder(self.forward_encoder(x, mask), mask).float().flatten(2).transpose(1, 2)
        target = patchify(x.float(), p)
        if self.cfg.norm_pix_loss:
            mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
            pred = pred * (var + 1e-6) ** 0.5 + mean
        removed = mask.flatten(1)[:, :, None]
        return unpatchify(torch.where(removed, pred, target), p, grid, self.in_chans)


def default_decoder_dim(encoder_width: int) -> int:
    """The decoder width chosen when none is given: the encoder's last width, at most the paper's 512 (320 for
    atto, 384 for femto, 512 from pico on): a decoder wider than the encoder only adds cost on small models."""
    return min(512, encoder_width)
