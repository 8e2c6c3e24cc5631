"""Export and benchmark toolchain for CvT. Importing it needs no backend SDK."""

from cvt_export import startup  # noqa: F401  (first: a Ctrl-C while the command imports is one line)
from cvt_ref.errors import CvtError

__all__ = ["CvtError"]
