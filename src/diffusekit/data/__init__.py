"""Datasets, all held in memory: 2-D toys, the Gaussian-mixture oracle, digits, MNIST-5k, image folders."""

from diffusekit.data.dataset import ArrayDataset
from diffusekit.data.images import load_digits, load_image_folder, load_mnist, read_image
from diffusekit.data.registry import DATASETS, load_dataset
from diffusekit.data.toys import TOYS, make_toy

__all__ = ["ArrayDataset", "DATASETS", "TOYS", "load_dataset", "make_toy", "load_digits", "load_mnist",
           "load_image_folder", "read_image"]
