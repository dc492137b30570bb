"""Data: image folders, zips of class folders read in place, the bundled digits, and batch sources."""
from .datasets import (ClassFolderDataset, DataError, TensorImageDataset, ZipClassFolderDataset, decode_image,
                       digits_dataset)
from .loaders import DIGITS, DataBundle, DataOptions, build_data, random_crop_with_padding

__all__ = ["ClassFolderDataset", "DIGITS", "DataBundle", "DataError", "DataOptions", "TensorImageDataset",
           "ZipClassFolderDataset", "build_data", "decode_image", "digits_dataset", "random_crop_with_padding"]
