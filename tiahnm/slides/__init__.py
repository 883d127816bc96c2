"""Whole-slide images to patch features, on TIAToolbox readers and maskers.

* :mod:`tiahnm.slides.reader`: open slides and plain images with checked scale.
* :mod:`tiahnm.slides.tiling`: tissue masks and patch coordinates (stored in level-0
  pixels).
* :mod:`tiahnm.slides.dataset`: a torch ``Dataset`` of one slide's patches.
* :mod:`tiahnm.slides.extract`: the ``tiahnm extract`` pipeline.
* :mod:`tiahnm.slides.store`: the HDF5 feature-file layout.
* :mod:`tiahnm.slides.annotations`: patch labels from GeoJSON, ASAP XML or masks.

Importing this package imports neither torch nor TIAToolbox.
"""
