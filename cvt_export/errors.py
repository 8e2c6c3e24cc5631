"""cvt_export shares cvt_ref's user-error type, so one `except CvtError` covers the toolchain."""

from cvt_ref.errors import CvtError, ImageError, WeightsError

__all__ = ["CvtError", "ImageError", "WeightsError"]
