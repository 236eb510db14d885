"""hoverdask: HoVer-Net nucleus segmentation and classification for whole-slide cohorts on Dask."""

__version__ = "0.1.0"
