"""Export and benchmark toolchain for CvT. Importing it needs no backend SDK."""

from cvt_export.errors import CvtError

__all__ = ["CvtError"]
