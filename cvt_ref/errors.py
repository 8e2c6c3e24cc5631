"""The one exception type users can cause; the CLI turns it into one line and exit code 2."""


class CvtError(Exception):
    """Bad user input: the message says what is wrong and what to do."""


class WeightsError(CvtError):
    """A checkpoint that cannot be read, is unsafe to unpickle, or does not fit the variant."""


class ImageError(CvtError):
    """An image file that cannot be opened or decoded."""


def first_line(e: BaseException, limit: int = 200) -> str:
    """A library exception's first line: enough to act on, short enough for a one-line error."""
    lines = str(e).strip().splitlines()
    return (lines[0] if lines else type(e).__name__)[:limit]
