"""Errors that the CLI reports as one line on stderr with exit code 2."""


class Ann2SnnError(Exception):
    """Bad input or an unsupported model: the message says what and where (file, node, op, opset)."""


class UnsupportedModelError(Ann2SnnError):
    """The model uses an op, attribute or structure the compiler cannot convert."""


class ArtifactError(Ann2SnnError):
    """A .snn file is missing, truncated, or not an ann2snn artifact."""


class DataError(Ann2SnnError):
    """A data set argument cannot be read."""
