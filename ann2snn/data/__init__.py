"""Data: the data sets (digits, Fashion-MNIST and other IDX folders, .npz arrays, image folders), read in batches.

`Samples` streams the inputs that calibration and verification draw, so memory does not grow with their number.
"""
from .image_folder import ImageFolderDataset, load_image_folder
from .inputs import Samples, data_samples, model_samples, noise_samples, tensor_samples
from .sets import ArrayDataset, dataset_input_shape, draw, load_dataset, make_loader, num_classes

__all__ = ["ArrayDataset", "ImageFolderDataset", "Samples", "data_samples", "dataset_input_shape", "draw",
           "load_dataset", "load_image_folder", "make_loader", "model_samples", "noise_samples", "num_classes",
           "tensor_samples"]
