"""Every published ConvNeXt weight as data: one frozen `WeightSpec` per `arch.tag`.

Sources: the facebookresearch/ConvNeXt and ConvNeXt-V2 READMEs (urls, top-1; no hashes published),
torchvision's `convnext.py` (urls whose names carry a sha256 prefix, top-1, resize 232-236 -> crop 224,
bilinear), timm's `convnext.py` default configs (crop_pct, test sizes, its own atto..nano and ImageNet-12k
weights on GitHub releases and the Hugging Face hub, the OpenCLIP, DINOv3 and EUPE ConvNeXts timm hosts there,
and timm's own variants: overlapping stems, head norm first, SimpleNorm, the large MLP head).
The first spec listed for an arch is its default. `UNSUPPORTED` names the weights timm lists whose architecture
model.py does not build, each with what it has that ours lacks (none today: every one of timm's is built).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from convnext.constants import CLIP_MEAN, CLIP_STD, CROP_MODES, IMAGENET_MEAN, IMAGENET_STD, INTERPOLATIONS

NON_COMMERCIAL = ("cc-by-nc-4.0", "fair-noncommercial-research-license")


@dataclass(frozen=True)
class WeightSpec:
    arch: str  # registered model name, e.g. "convnext_tiny"
    tag: str  # e.g. "fb_in1k"
    url: str
    sha256: str | None  # full hex digest or a prefix of >= 8 digits; None where the publisher gives none
    layout: str  # layout of the published file: "official", "timm", "torchvision", "hf" or "ours"
    num_classes: int = 1000  # 0 = backbone only (self-supervised pre-training)
    input_size: int = 224  # train and eval resolution
    crop_pct: float = 0.875  # eval: resize to input_size / crop_pct, center-crop input_size
    test_input_size: int | None = None  # a larger eval size that scores better (timm's measurement)
    test_crop_pct: float | None = None
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bicubic"  # one of INTERPOLATIONS
    crop_mode: str = "center"  # one of CROP_MODES; the official >= 384 px evals squash (warp) the image
    top1: float | None = None  # ImageNet-1k top-1 (%) as published, at input_size
    license: str = "mit"
    recipe: str = ""  # how the weights were trained, in a line
    filename: str = ""  # name in the download cache; default "<arch>.<tag><ext of the url>"
    model_kwargs: tuple[tuple[str, Any], ...] = field(default=())  # config fields the weights need

    def __post_init__(self) -> None:
        if self.sha256 is not None and not re.fullmatch(r"[0-9a-f]{8,64}", self.sha256):
            raise ValueError(f"{self.name}: sha256 must be 8 to 64 lowercase hex digits, got {self.sha256!r}")
        if self.interpolation not in INTERPOLATIONS or self.crop_mode not in CROP_MODES:
            raise ValueError(f"{self.name}: interpolation must be one of {INTERPOLATIONS} and crop_mode one of "
                             f"{CROP_MODES}, got {self.interpolation!r}, {self.crop_mode!r}")  # fmt: skip
        if not self.filename:
            ext = re.search(r"(\.[A-Za-z]+)$", self.url.rsplit("/", 1)[-1])
            object.__setattr__(self, "filename", f"{self.name}{ext.group(1) if ext else '.pth'}")

    @property
    def name(self) -> str:
        return f"{self.arch}.{self.tag}"

    @property
    def non_commercial(self) -> bool:
        return self.license in NON_COMMERCIAL


FB = "https://dl.fbaipublicfiles.com/convnext/"
TV = "https://download.pytorch.org/models/"
RSB = "https://github.com/rwightman/pytorch-image-models/releases/download/v0.1-rsb-weights/"
AT288 = {"test_input_size": 288, "test_crop_pct": 1.0}  # timm: these score best when evaluated at 288
EPS_1E5 = (("norm_eps", 1e-5),)  # timm's xxlarge (the OpenCLIP tower) has LayerNorm eps 1e-5, ours 1e-6 by default
SQUASH = "squash"  # the official repos evaluate at >= 384 px by resizing both sides: no crop, aspect not kept


def _w(name: str, url: str, sha256: str | None = None, layout: str = "official", **kw: Any) -> WeightSpec:
    arch, tag = name.split(".", 1)
    return WeightSpec(arch, tag, url, sha256, layout, **kw)


def _at(size: int, crop_mode: str = "center") -> dict[str, Any]:
    return {"input_size": size, "crop_pct": 1.0, "crop_mode": crop_mode}


def _hf(name: str) -> str:
    return f"https://huggingface.co/timm/{name}/resolve/main/model.safetensors"


def _official_v1() -> list[WeightSpec]:
    """facebookresearch/ConvNeXt: ImageNet-1k, ImageNet-22k and 22k->1k weights (MIT)."""
    in1k = {"tiny": 82.1, "small": 83.1, "base": 83.8, "large": 84.3}
    in1k_384 = {"base": 85.1, "large": 85.5}
    ft = {"tiny": (82.9, 84.1), "small": (84.6, 85.8), "base": (85.8, 86.8), "large": (86.6, 87.5),
          "xlarge": (87.0, 87.8)}  # fmt: skip
    r1k, r22k = "ImageNet-1k, 300 epochs, the paper's recipe", "ImageNet-22k 90 epochs"
    ft22k = r22k + ", fine-tuned on ImageNet-1k 30 epochs"
    specs = []
    for s, (t224, t384) in ft.items():
        a, ema = f"convnext_{s}", "_ema" if s == "xlarge" else ""  # the XL 22k->1k files carry an _ema suffix
        if s in in1k:
            specs.append(_w(f"{a}.fb_in1k", f"{FB}{a}_1k_224_ema.pth", top1=in1k[s], recipe=r1k + "; EMA", **AT288))
        specs.append(_w(f"{a}.fb_in22k_ft_in1k", f"{FB}{a}_22k_1k_224{ema}.pth", top1=t224, recipe=ft22k, **AT288))
        specs.append(_w(f"{a}.fb_in22k_ft_in1k_384", f"{FB}{a}_22k_1k_384{ema}.pth", top1=t384,
                        recipe=ft22k + " at 384px", **_at(384, SQUASH)))  # fmt: skip
        if s in in1k_384:
            specs.append(_w(f"{a}.fb_in1k_384", f"{FB}{a}_1k_384.pth", top1=in1k_384[s],
                            recipe=r1k + ", fine-tuned at 384px", **_at(384, SQUASH)))  # fmt: skip
        specs.append(_w(f"{a}.fb_in22k", f"{FB}{a}_22k_224.pth", num_classes=21841, recipe=r22k + " (21841 classes)"))
    for s, t in {"small": 78.7, "base": 82.0, "large": 82.6}.items():  # isotropic; L was trained with layer scale
        kw = {"model_kwargs": (("layer_scale_init", 1e-6),)} if s == "large" else {}
        specs.append(_w(f"convnext_isotropic_{s}.fb_in1k", f"{FB}convnext_iso_{s}_1k_224_ema.pth", top1=t,
                        recipe=r1k + "; EMA", **kw))  # fmt: skip
    return specs


def _official_v2() -> list[WeightSpec]:
    """facebookresearch/ConvNeXt-V2: FCMAE pre-trained then fine-tuned, EMA weights (CC-BY-NC 4.0)."""
    nc = {"license": "cc-by-nc-4.0"}
    in1k = {"atto": 76.7, "femto": 78.5, "pico": 80.3, "nano": 81.9, "tiny": 83.0, "base": 84.9, "large": 85.8,
            "huge": 86.3}  # fmt: skip
    in22k = {("nano", 224): 82.1, ("nano", 384): 83.4, ("tiny", 224): 83.9, ("tiny", 384): 85.1,
             ("base", 224): 86.8, ("base", 384): 87.7, ("large", 224): 87.3, ("large", 384): 88.2,
             ("huge", 384): 88.7, ("huge", 512): 88.9}  # fmt: skip
    specs = []
    for s, t in in1k.items():
        a, test = f"convnextv2_{s}", {**AT288, "test_crop_pct": 0.95 if s in ("atto", "femto", "pico") else 1.0}
        specs.append(_w(f"{a}.fcmae_ft_in1k", f"{FB}convnextv2/im1k/{a}_1k_224_ema.pt", top1=t,
                        recipe="FCMAE on ImageNet-1k, fine-tuned on ImageNet-1k", **test, **nc))  # fmt: skip
    for (s, size), t in in22k.items():
        a, suffix = f"convnextv2_{s}", "" if size == 224 else f"_{size}"
        specs.append(_w(f"{a}.fcmae_ft_in22k_in1k{suffix}", f"{FB}convnextv2/im22k/{a}_22k_{size}_ema.pt", top1=t,
                        recipe=f"FCMAE, fine-tuned on ImageNet-22k then ImageNet-1k at {size}px",
                        **(AT288 if size == 224 else _at(size, SQUASH)), **nc))  # fmt: skip
    for s in in1k:  # the bare FCMAE encoders as timm converted them (the official files hold sparse-conv weights)
        specs.append(_w(f"convnextv2_{s}.fcmae", _hf(f"convnextv2_{s}.fcmae"), None, "timm", num_classes=0,
                        recipe="FCMAE self-supervised pre-training on ImageNet-1k; no classifier", **nc))  # fmt: skip
    return specs


def _torchvision() -> list[WeightSpec]:
    """torchvision's re-trained V1 weights; the url names carry a sha256 prefix. Eval: resize 230-236, crop 224."""
    rows = {"tiny": ("983f1562", 82.520, 236), "small": ("0c510722", 83.616, 230),
            "base": ("6075fbad", 84.062, 232), "large": ("ea097f82", 84.414, 232)}  # fmt: skip
    recipe = "torchvision: 600 epochs, TrivialAugment, train crop 176, EMA"
    return [
        _w(
            f"convnext_{s}.tv_in1k",
            f"{TV}convnext_{s}-{h}.pth",
            h,
            "torchvision",
            top1=t,
            crop_pct=round(224 / r, 4),
            interpolation="bilinear",
            license="bsd-3-clause",
            recipe=recipe,
        )  # fmt: skip
        for s, (h, t, r) in rows.items()
    ]


def _timm() -> list[WeightSpec]:
    """timm's own weights: the small models (GitHub releases, sha256 prefix in the name) and the HF hub ones."""
    kw = {"license": "apache-2.0", "test_input_size": 288, "test_crop_pct": 0.95}
    hub = {**kw, "crop_pct": 0.95, "test_crop_pct": 1.0}
    r12k = "timm: ImageNet-12k (11821 classes), fine-tuned on ImageNet-1k"
    return [
        _w("convnext_atto.d2_in1k", f"{RSB}convnext_atto_d2-01bb0f51.pth", "01bb0f51", "timm", top1=75.7,
           recipe="timm: ImageNet-1k, recipe 'D2'", **kw),
        _w("convnext_femto.d1_in1k", f"{RSB}convnext_femto_d1-d71d5b4c.pth", "d71d5b4c", "timm", top1=77.5,
           recipe="timm: ImageNet-1k, recipe 'D1'", **kw),
        _w("convnext_pico.d1_in1k", f"{RSB}convnext_pico_d1-10ad7f0d.pth", "10ad7f0d", "timm", top1=79.5,
           recipe="timm: ImageNet-1k, recipe 'D1'", **kw),
        _w("convnext_nano.d1h_in1k", f"{RSB}convnext_nano_d1h-7eb4bdea.pth", "7eb4bdea", "timm", top1=80.8,
           recipe="timm: ImageNet-1k, recipe 'D1h'", **hub),
        _w("convnext_nano.in12k_ft_in1k", _hf("convnext_nano.in12k_ft_in1k"), None, "timm", recipe=r12k, **hub),
        _w("convnext_tiny.in12k_ft_in1k", _hf("convnext_tiny.in12k_ft_in1k"), None, "timm", recipe=r12k, **hub),
        _w("convnext_small.in12k_ft_in1k", _hf("convnext_small.in12k_ft_in1k"), None, "timm", recipe=r12k, **hub),
        _w("convnext_xxlarge.clip_laion2b_soup_ft_in1k", _hf("convnext_xxlarge.clip_laion2b_soup_ft_in1k"), None,
           "timm", top1=88.6, mean=CLIP_MEAN, std=CLIP_STD, license="apache-2.0", **_at(256), model_kwargs=EPS_1E5,
           recipe="OpenCLIP on LAION-2B (soup), fine-tuned on ImageNet-1k"),
    ]  # fmt: skip


def _timm_hub() -> list[WeightSpec]:
    """More of timm's Hugging Face hub weights (as timm's `convnext.py` configs give them): its ImageNet-12k runs
    (11821 classes) and their fine-tunes; OpenCLIP image towers trained on LAION-2B or LAION-Aesthetics ("laiona"),
    whose 640 / 1024 outputs are the CLIP projection (timm stores it as the head, with a zero bias), and their
    fine-tunes; the DINOv3 and EUPE self-supervised backbones (LVD-1689M images; no head)."""
    r12k, ft1k, proj = "timm: ImageNet-12k (11821 classes)", ", fine-tuned on ImageNet-1k", "; CLIP projection head"
    eps = {"model_kwargs": EPS_1E5}
    in12k = {"license": "apache-2.0"}
    clip = {"mean": CLIP_MEAN, "std": CLIP_STD, "license": "apache-2.0"}
    b2, ba = "OpenCLIP on LAION-2B", "OpenCLIP on LAION-Aesthetics"
    rows: dict[str, tuple[int, dict[str, Any], str]] = {  # name: (classes, preprocessing and license, recipe)
        "convnext_nano.in12k": (11821, {**in12k, "crop_pct": 0.95}, r12k),
        "convnext_nano.r384_in12k": (11821, {**in12k, **_at(384)}, r12k + " at 384px"),
        "convnext_nano.r384_ad_in12k": (11821, {**in12k, **_at(384)}, r12k + " at 384px (timm's 'ad' run)"),
        "convnext_nano.r384_in12k_ft_in1k": (1000, {**in12k, **_at(384)}, r12k + ft1k + " at 384px"),
        "convnext_tiny.in12k": (11821, {**in12k, "crop_pct": 0.95}, r12k),
        "convnext_tiny.in12k_ft_in1k_384": (1000, {**in12k, **_at(384, SQUASH)}, r12k + ft1k + " at 384px"),
        "convnext_small.in12k": (11821, {**in12k, "crop_pct": 0.95}, r12k),
        "convnext_small.in12k_ft_in1k_384": (1000, {**in12k, **_at(384, SQUASH)}, r12k + ft1k + " at 384px"),
        "convnext_base.clip_laion2b": (640, {**clip, **_at(256)}, b2 + proj),
        "convnext_base.clip_laion2b_augreg": (640, {**clip, **_at(256)}, b2 + " (augreg)" + proj),
        "convnext_base.clip_laion2b_augreg_ft_in1k": (1000, {**clip, **_at(256)}, b2 + " (augreg)" + ft1k),
        "convnext_base.clip_laion2b_augreg_ft_in12k": (11821, {**clip, **_at(256)}, b2 + " (augreg), then IN-12k"),
        "convnext_base.clip_laion2b_augreg_ft_in12k_in1k": (1000, {**clip, **_at(256)},
                                                            b2 + " (augreg), then IN-12k" + ft1k),
        "convnext_base.clip_laion2b_augreg_ft_in12k_in1k_384": (1000, {**clip, **_at(384, SQUASH)},
                                                                b2 + " (augreg), then IN-12k" + ft1k + " at 384px"),
        "convnext_base.clip_laiona": (640, {**clip, **_at(256)}, ba + proj),
        "convnext_base.clip_laiona_320": (640, {**clip, **_at(320)}, ba + " at 320px" + proj),
        "convnext_base.clip_laiona_augreg_320": (640, {**clip, **_at(320)}, ba + " (augreg) at 320px" + proj),
        "convnext_base.clip_laiona_augreg_ft_in1k_384": (1000, {**clip, **_at(384)},
                                                         ba + " (augreg)" + ft1k + " at 384px"),
        "convnext_xxlarge.clip_laion2b_soup": (1024, {**clip, **_at(256), **eps}, b2 + " (soup)" + proj),
        "convnext_xxlarge.clip_laion2b_rewind": (1024, {**clip, **_at(256), **eps}, b2 + " (rewind)" + proj),
        "convnext_xxlarge.clip_laion2b_soup_ft_in12k": (11821, {**clip, **_at(256), **eps},
                                                        b2 + " (soup), then IN-12k"),
        **{f"convnext_{s}.dinov3_lvd1689m": (0, {"crop_pct": 1.0, "license": "dinov3-license"},
                                             "DINOv3, distilled from its self-supervised ViT-7B; no head")
           for s in ("tiny", "small", "base", "large")},
        **{f"convnext_{s}.eupe_lvd1689m": (0, {**_at(256), "license": "fair-noncommercial-research-license"},
                                           "EUPE distillation on LVD-1689M images; no head")
           for s in ("tiny", "small", "base")},
    }  # fmt: skip
    return [_w(n, _hf(n), None, "timm", num_classes=c, recipe=r, **kw) for n, (c, kw, r) in rows.items()]


def _timm_variants() -> list[WeightSpec]:
    """timm's own variants (`VARIANTS` holds their options): overlapping stems (`_ols`), head norm first (`_hnf`),
    SimpleNorm (`zepto_rms`) and the MLP head of the OpenCLIP ConvNeXt-L towers (`large_mlp`, 768 outputs: the CLIP
    projection) and their fine-tunes."""
    kw = {"license": "apache-2.0", "test_input_size": 288, "test_crop_pct": 0.95}
    at95 = {**kw, "crop_pct": 0.95, "test_crop_pct": 1.0}
    ra4 = {"license": "apache-2.0", "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
    specs = [
        _w("convnext_zepto_rms.ra4_e3600_r224_in1k", _hf("convnext_zepto_rms.ra4_e3600_r224_in1k"), None, "timm",
           recipe="timm: ImageNet-1k, recipe 'RA4', 3600 epochs at 224px", **ra4),
        _w("convnext_zepto_rms_ols.ra4_e3600_r224_in1k", _hf("convnext_zepto_rms_ols.ra4_e3600_r224_in1k"), None,
           "timm", recipe="timm: ImageNet-1k, recipe 'RA4', 3600 epochs at 224px", crop_pct=0.9, **ra4),
        _w("convnext_atto_ols.a2_in1k", f"{RSB}convnext_atto_ols_a2-78d1c8f3.pth", "78d1c8f3", "timm",
           recipe="timm: ImageNet-1k, recipe 'A2'", **kw),
        _w("convnext_femto_ols.d1_in1k", f"{RSB}convnext_femto_ols_d1-246bf2ed.pth", "246bf2ed", "timm",
           recipe="timm: ImageNet-1k, recipe 'D1'", **kw),
        _w("convnext_pico_ols.d1_in1k", f"{RSB}convnext_pico_ols_d1-611f0ca7.pth", "611f0ca7", "timm",
           recipe="timm: ImageNet-1k, recipe 'D1'", **at95),
        _w("convnext_nano_ols.d1h_in1k", f"{RSB}convnext_nano_ols_d1h-ae424a9a.pth", "ae424a9a", "timm",
           recipe="timm: ImageNet-1k, recipe 'D1h'", **at95),
        _w("convnext_tiny_hnf.a2h_in1k", f"{RSB}convnext_tiny_hnf_a2h-ab7e9df2.pth", "ab7e9df2", "timm",
           recipe="timm: ImageNet-1k, recipe 'A2h'", **at95),
    ]  # fmt: skip
    clip = {"mean": CLIP_MEAN, "std": CLIP_STD, "license": "apache-2.0"}
    b2, proj = "OpenCLIP on LAION-2B", "; CLIP projection head"
    ft1k, in12k = ", fine-tuned on ImageNet-1k", ", then IN-12k"
    rows: dict[str, tuple[int, dict[str, Any], str]] = {  # tag: (classes, preprocessing, recipe); default first
        "clip_laion2b_augreg_ft_in1k": (1000, _at(256), b2 + " (augreg)" + ft1k),
        "clip_laion2b_augreg_ft_in1k_384": (1000, _at(384, SQUASH), b2 + " (augreg)" + ft1k + " at 384px"),
        "clip_laion2b_augreg": (768, _at(256), b2 + " (augreg)" + proj),
        "clip_laion2b_ft_320": (768, _at(320), b2 + ", fine-tuned at 320px" + proj),
        "clip_laion2b_ft_soup_320": (768, _at(320), b2 + ", fine-tuned at 320px (soup)" + proj),
        "clip_laion2b_augreg_ft_in12k_384": (11821, _at(384, SQUASH), b2 + " (augreg)" + in12k + " at 384px"),
        "clip_laion2b_soup_ft_in12k_320": (11821, _at(320), b2 + " (soup)" + in12k + " at 320px"),
        "clip_laion2b_soup_ft_in12k_384": (11821, _at(384, SQUASH), b2 + " (soup)" + in12k + " at 384px"),
        "clip_laion2b_soup_ft_in12k_in1k_320": (1000, _at(320), b2 + " (soup)" + in12k + ft1k + " at 320px"),
        "clip_laion2b_soup_ft_in12k_in1k_384": (1000, _at(384, SQUASH), b2 + " (soup)" + in12k + ft1k + " at 384px"),
    }
    names = {f"convnext_large_mlp.{t}": row for t, row in rows.items()}
    return specs + [
        _w(n, _hf(n), None, "timm", num_classes=c, recipe=r, **clip, **pre) for n, (c, pre, r) in names.items()
    ]


# timm's weights whose architecture model.py does not build: name -> what that architecture has that ours lacks.
UNSUPPORTED: dict[str, str] = {}


def _table() -> dict[str, WeightSpec]:
    specs = _official_v1() + _official_v2() + _torchvision() + _timm() + _timm_hub() + _timm_variants()
    table: dict[str, WeightSpec] = {}
    for spec in specs:
        if spec.name in table:
            raise ValueError(f"weight {spec.name!r} listed twice")
        table[spec.name] = spec
    return table


WEIGHTS: dict[str, WeightSpec] = _table()


def tags(arch: str) -> list[str]:
    """The weight tags published for `arch`, default first."""
    return [s.tag for s in WEIGHTS.values() if s.arch == arch]


def resolve_spec(arch: str, tag: str | None = None) -> WeightSpec:
    """The spec of `arch.tag`; `tag=None` gives the arch's default weights."""
    available = tags(arch)
    if not available:
        raise KeyError(f"no published weights for {arch!r}; `convnext list --pretrained` shows those that have some")
    tag = tag or available[0]
    if f"{arch}.{tag}" not in WEIGHTS:
        raise KeyError(f"no weights {arch}.{tag}; {arch} has: {', '.join(available)}")
    return WEIGHTS[f"{arch}.{tag}"]
