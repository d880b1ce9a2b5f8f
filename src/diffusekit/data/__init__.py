"""Datasets, all held in memory: 2-D toys, the Gaussian-mixture oracle, digits, MNIST-5k, image folders."""

from diffusekit.data.dataset import ArrayDataset
from diffusekit.data.folder import load_image_folder
from diffusekit.data.images import load_digits, load_mnist, read_image
from diffusekit.data.registry import DATASETS, load_dataset
from diffusekit.data.toys import TOYS, make_toy

__all__ = ["DATASETS", "TOYS", "ArrayDataset", "load_dataset", "load_digits", "load_image_folder", "load_mnist",
           "make_toy", "read_image"]
