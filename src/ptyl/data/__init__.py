"""Offline real datasets, few-shot subsets and loaders for your own images.

>>> from ptyl.data import load_dataset, few_shot_subset
>>> source = load_dataset("mnist5k", "train")
>>> target = few_shot_subset(load_dataset("kmnist", "train"), n_per_class=10, seed=0)
"""

from ptyl.data.augment import SimCLRAugment
from ptyl.data.datasets import (
    EMBEDDED_DIR,
    SPLIT_SEED,
    TEST_FRACTION,
    ImageDataset,
    available_datasets,
    load_dataset,
    resize_images,
    to_image_tensor,
)
from ptyl.data.loaders import IMAGE_EXTENSIONS, load_idx_pair, load_image_folder, load_npz, read_idx, write_idx
from ptyl.data.segmentation import DigitCanvasSegmentation, make_segmentation_splits
from ptyl.data.subsets import balanced_split, class_counts, few_shot_subset, hold_out, stratified_split_indices
from ptyl.data.text import TextDataset, available_text_datasets, collate_text, load_text_dataset

__all__ = [
    "EMBEDDED_DIR",
    "IMAGE_EXTENSIONS",
    "SPLIT_SEED",
    "TEST_FRACTION",
    "DigitCanvasSegmentation",
    "ImageDataset",
    "SimCLRAugment",
    "TextDataset",
    "available_text_datasets",
    "collate_text",
    "load_text_dataset",
    "available_datasets",
    "balanced_split",
    "class_counts",
    "few_shot_subset",
    "hold_out",
    "load_dataset",
    "load_idx_pair",
    "load_image_folder",
    "load_npz",
    "make_segmentation_splits",
    "read_idx",
    "resize_images",
    "stratified_split_indices",
    "to_image_tensor",
    "write_idx",
]
