"""onnxopt: an ONNX graph-rewriting optimizer.

    import onnxopt
    model, report = onnxopt.optimize("model.onnx")          # lossless default pipeline
    print(report.format_table())
    onnxopt.save_model(model, "model.opt.onnx")

The passes live in :mod:`onnxopt.passes`, custom runtime ops in :mod:`onnxopt.runtime_ops`.
"""

from ._version import __version__
from .api import optimize
from .errors import OnnxoptError
from .export import export_torch
from .io import load_model, save_model
from .manager import PassManager
from .pass_base import Pass, PassContext, PassResult, PreconditionFailed
from .registry import PassRegistry, Preset
from .report import Report
from .verify import VerifyResult, verify

__all__ = [
    "__version__",
    "optimize",
    "verify",
    "export_torch",
    "load_model",
    "save_model",
    "OnnxoptError",
    "Pass",
    "PassContext",
    "PassManager",
    "PassRegistry",
    "PassResult",
    "PreconditionFailed",
    "Preset",
    "Report",
    "VerifyResult",
]
