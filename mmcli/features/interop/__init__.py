"""Interoperability with CLAM, TRIDENT and STAMP tile-feature h5 files: layouts, import and export."""
from mmcli.features.interop.formats import FORMATS, FormatError, TileFeatures, get_format

__all__ = ["FORMATS", "FormatError", "TileFeatures", "get_format"]
