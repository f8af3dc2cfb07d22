"""Errors that the CLI reports as one line on stderr with exit code 2."""


class Ann2SnnError(Exception):
    """Bad input or an unsupported model: the message says what and where (file, node, op, opset)."""


class UnsupportedModelError(Ann2SnnError):
    """The model uses an op, attribute or structure the compiler cannot convert."""


class ArtifactError(Ann2SnnError):
    """A .snn file is missing, truncated, or not an ann2snn artifact."""


class DataError(Ann2SnnError):
    """A data set argument cannot be read."""


class VerificationError(Ann2SnnError):
    """The SNN was built but failed verification (ann2snn.convert_onnx; the CLI's exit code 1):
    `verification` says where (an ann2snn.verify.Verification), `snn` is the SNN that failed."""

    def __init__(self, message: str, verification: object, snn: object) -> None:
        super().__init__(message)
        self.verification = verification
        self.snn = snn
