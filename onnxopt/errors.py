"""Exception hierarchy.  Each error carries the CLI exit code it maps to, so the
command line prints one clear line and exits with a code a script can test."""

from __future__ import annotations


class OnnxoptError(Exception):
    """Base class of every error onnxopt reports to a user (exit code 1)."""

    exit_code = 1


class InputNotFoundError(OnnxoptError):
    """The input model path does not exist or is not a file."""

    exit_code = 3


class InvalidModelError(OnnxoptError):
    """The input is not an ONNX model, or is truncated/corrupt, or fails the checker."""

    exit_code = 4


class UnsupportedModelError(OnnxoptError):
    """A valid ONNX model that onnxopt cannot handle (e.g. opset out of range)."""

    exit_code = 5


class OutputPathError(OnnxoptError):
    """The output path would overwrite the input or cannot be written."""

    exit_code = 6


class PipelineError(OnnxoptError):
    """Bad pipeline: unknown pass or preset, ordering constraint violated, bad option."""

    exit_code = 7


class ValidationError(OnnxoptError):
    """A pass produced an invalid graph (caught by the validation run after a pass)."""

    exit_code = 8


class VerificationError(OnnxoptError):
    """Optimized outputs differ from the original beyond the tolerance, or verify inputs are bad."""

    exit_code = 9


class InputDataError(OnnxoptError):
    """Sample data given by the user is unusable: ``--inputs`` / ``--calibration-data`` files
    (missing, unreadable, pickled, wrong names, shapes, dtypes or non-finite values) and
    ``--input-shape`` values (unknown input, negative or too large)."""

    exit_code = 11
