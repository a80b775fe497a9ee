"""Datasets for certification (MNIST, CIFAR-10, ImageNet) and the table of their facts; see
:mod:`rsjax.data.datasets`."""

from rsjax.data.datasets import (
    DATA_DIR_ENV,
    DATASET_INFO,
    SPLITS,
    Dataset,
    DatasetInfo,
    imagenet_transform,
    load_dataset,
    resize_center_crop,
)

__all__ = ["DATASET_INFO", "DATA_DIR_ENV", "SPLITS", "Dataset", "DatasetInfo", "load_dataset", "imagenet_transform",
           "resize_center_crop"]
