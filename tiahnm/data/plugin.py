"""Built-in bag sources, registered through the public hook."""

from __future__ import annotations

from tiahnm.hookspecs import Register, hookimpl


@hookimpl
def tiahnm_register_bag_sources(register: Register) -> None:
    """Register the built-in dataset readers."""
    # The factories are the classes, so option checking sees their real signatures.
    from tiahnm.data.foreign import (
        ClamPtFolder,
        Slide2VecFolder,
        StampH5Folder,
        TiaZarrFolder,
    )
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
        "clam_pt",
        ClamPtFolder,
        description="CLAM / MHIM-MIL pt_files + h5_files coordinates + labels CSV",
    )
    register(
        "stamp_h5",
        StampH5Folder,
        description="STAMP h5 features (feats, coords in um -> level-0 px) + labels CSV",
    )
    register(
        "slide2vec",
        Slide2VecFolder,
        description="slide2vec output folder (tile_embeddings + tiles) + labels CSV",
    )
    register(
        "tia_zarr",
        TiaZarrFolder,
        description="TIAToolbox DeepFeatureExtractor zarr output + labels CSV",
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
