"""An example third-party modality for mscn: RGB images (PNG/JPEG) in, PNG out.

Installed as the distribution ``mscn-image-plugin``, it registers the ``image`` modality
through the ``mscn.modalities`` entry point; nothing in mscn itself knows about it.
"""

from __future__ import annotations

from .modality import ImageItem, ImageModality, ImageOptions, pixel_grid, psnr_db

__all__ = ["ImageItem", "ImageModality", "ImageOptions", "pixel_grid", "psnr_db"]
__version__ = "0.1.0"
