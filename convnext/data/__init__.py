"""Datasets (image folders, CIFAR, the embedded `digits`) and their torchvision.transforms.v2 pipelines."""

from convnext.data.datasets import (
    DigitsDataset,
    ImageFolder,
    SeededDataset,
    build_dataset,
    build_eval_dataset,
    collate_skip,
    load_image,
)
from convnext.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    RandAugmentMstd,
    eval_transform,
    mix_transform,
    train_transform,
    tta_logits,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DigitsDataset",
    "ImageFolder",
    "RandAugmentMstd",
    "SeededDataset",
    "build_dataset",
    "build_eval_dataset",
    "collate_skip",
    "eval_transform",
    "load_image",
    "mix_transform",
    "train_transform",
    "tta_logits",
]
