"""The one exception type torchdkm raises for bad input.

It subclasses ``ValueError`` so callers that already guard against bad values
catch it, while ``except TorchdkmError`` singles out this library.
"""


class TorchdkmError(ValueError):
    """Bad input to torchdkm: the message names the layer or key and the value."""
