"""Datasets for certification (MNIST, CIFAR-10, ImageNet); see :mod:`rsjax.data.datasets`."""

from rsjax.data.datasets import DATASETS, Dataset, imagenet_transform, load_dataset, resize_center_crop

__all__ = ["DATASETS", "Dataset", "load_dataset", "imagenet_transform", "resize_center_crop"]
