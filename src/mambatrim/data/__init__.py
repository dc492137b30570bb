"""Data: image folders, zips of class folders read in place, the bundled digits, video folders and the bundled
moving shapes, and batch sources."""
from .datasets import (ClassFolderDataset, DataError, TensorImageDataset, ZipClassFolderDataset, decode_image,
                       digits_dataset)
from .build import build_data
from .loaders import DIGITS, MOVING_SHAPES, TASKS, DataBundle, DataOptions, random_crop_with_padding

__all__ = ["ClassFolderDataset", "DIGITS", "DataBundle", "DataError", "DataOptions", "MOVING_SHAPES", "TASKS",
           "TensorImageDataset", "ZipClassFolderDataset", "build_data", "decode_image", "digits_dataset", "random_crop_with_padding"]
