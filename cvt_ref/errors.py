"""The one exception type users can cause; the CLI turns it into one line and exit code 2."""


class CvtError(Exception):
    """Bad user input: the message says what is wrong and what to do."""


class WeightsError(CvtError):
    """A checkpoint that cannot be read, is unsafe to unpickle, or does not fit the variant."""


class ImageError(CvtError):
    """An image file that cannot be opened or decoded."""
