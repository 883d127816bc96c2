"""Built-in bag sources, registered through the public hook."""

from __future__ import annotations

from tiahnm.hookspecs import Register, hookimpl


@hookimpl
def tiahnm_register_bag_sources(register: Register) -> None:
    """Register the built-in dataset readers."""
    # The factories are the classes, so option checking sees their real signatures.
    from tiahnm.data.h5_features import H5FeatureFolder
    from tiahnm.data.image_patches import ImagePatchBags
    from tiahnm.data.mil_csv import MILCSVSource
    from tiahnm.data.mnist_bags import MNISTBags
    from tiahnm.data.slide_patches import SlidePatchBags

    register(
        "h5_folder",
        H5FeatureFolder,
        description="Per-slide HDF5 features (CLAM/TRIDENT layout) + labels CSV",
    )
    register(
        "mil_csv", MILCSVSource, description="Classic MIL CSV: label, bag_id, features"
    )
    register(
        "mnist_bags",
        MNISTBags,
        description="MNIST-bags (Ilse et al. 2018): positive iff a target digit is in the bag",
    )
    register(
        "image_patches",
        ImagePatchBags,
        description="Folder of images + labels CSV: one bag of non-overlapping "
        "patches per image, white background dropped",
    )
    register(
        "slide_patches",
        SlidePatchBags,
        description="Whole-slide images (TIAToolbox) + labels CSV: one bag of tissue "
        "patch images per slide, for encoder training",
    )
