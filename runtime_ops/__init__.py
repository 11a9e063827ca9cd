"""onnxopt.runtime_ops: custom ONNX Runtime operators emitted by onnxopt's passes.

All ops live in one custom domain, :data:`DOMAIN`, version :data:`DOMAIN_VERSION`.  Each op
will carry a schema, a model-local FunctionProto body made of standard ONNX ops (so stock
ONNX Runtime runs it with no extra library) and a numpy reference implementation.  The
operators themselves arrive with the PowerQuant and modular-arithmetic passes; this package
currently only fixes the domain name those passes share.
"""

DOMAIN = "ai.onnxopt"
DOMAIN_VERSION = 1

__all__ = ["DOMAIN", "DOMAIN_VERSION"]
