"""The figures of the suite: BOPs, fidelity to FP32, labelled accuracy, spam/ham probe.

* BOPs (bit operations) = sum over the MAC nodes (Conv, ConvTranspose, Gemm, MatMul and their
  integer/QLinear forms) of MACs x bits of operand 1 x bits of operand 2 (:func:`effective_bops`),
  on the configuration's own model with the graph inputs fixed to one evaluation sample and
  shapes from ORT's symbolic shape inference (so a pruned model counts fewer MACs, and a
  computed Reshape target is not counted as 1).
  An operand's bits: a float tensor 32; an integer weight (a constant, or the constant
  input of a DequantizeLinear) the width its values actually use, ceil(log2(max|q| + 1)) + 1
  for signed storage (a 4-bit weight in int8 storage counts 4), the storage width for
  unsigned; a quantized activation (DequantizeLinear of a computed tensor, QuantizeLinear
  or DynamicQuantizeLinear output) the configuration's activation bits.  A layer a
  quantizer leaves in float counts 32 x 32.
* Fidelity against the FP32 model's outputs on the same real inputs: top-1 agreement, mean
  KL(FP32 || config) of the softmax, cosine similarity of the logit (or embedding) vectors.
* Embedding models: a logistic regression (L2, L-BFGS from scipy) fitted on the FP32
  embeddings of the first half of the labelled inputs, applied unchanged to each
  configuration's embeddings of the second half.
"""

from __future__ import annotations

import contextlib
import tempfile
from typing import Any, Mapping, Sequence

import numpy as np
import onnx
from onnx import numpy_helper
import scipy.optimize
import scipy.special

FLOAT_BITS = 32


MAC_OPERANDS = {"QLinearConv": (0, 3), "QLinearMatMul": (0, 3)}  # others: inputs 0 and 1


def integer_bits(values: np.ndarray) -> int:
    """Bits an integer tensor's values use: signed ceil(log2(max|q| + 1)) + 1, unsigned its storage width."""
    storage = 8 * values.dtype.itemsize
    if values.size == 0 or values.dtype.kind == "u":
        return storage
    peak = int(np.abs(values.astype(np.int64)).max())
    return min(storage, int(np.ceil(np.log2(peak + 1))) + 1)


def with_fixed_inputs(model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]]) -> onnx.ModelProto:
    """A copy of ``model`` whose graph inputs named in ``input_shapes`` have those static shapes, without
    intermediate/output shapes (shape inference recomputes them)."""
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    del fixed.graph.value_info[:]  # stale symbolic shapes another tool recorded would win over inference
    for value in fixed.graph.output:
        if value.type.HasField("tensor_type"):
            value.type.tensor_type.ClearField("shape")
    for value in fixed.graph.input:
        if value.name in input_shapes and value.type.HasField("tensor_type"):
            dims = value.type.tensor_type.shape.dim
            del dims[:]
            for size in input_shapes[value.name]:
                dims.add().dim_value = int(size)
    return fixed


def inferred_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with shapes from ONNX Runtime's symbolic shape inference (it propagates computed
    Reshape targets that ONNX's own inference leaves symbolic, which would count as 1), or from
    ONNX shape inference when that fails."""
    from onnxopt.graph import with_inferred_shapes

    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        # it saves temporary models (with external .data files) into the working directory
        with tempfile.TemporaryDirectory(prefix="bench-shapes-") as tmp, contextlib.chdir(tmp):
            inferred = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    except Exception:  # noqa: BLE001 - e.g. an op it does not know
        inferred = None
    return inferred if inferred is not None else with_inferred_shapes(model)


def effective_bops(model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]], bits_a: int) -> dict[str, Any]:
    """MACs, BOPs (operand bits as in the module docstring), the fraction of MACs with both
    operands quantized, and the number of MAC nodes of unknown shape."""
    from onnxopt.metrics import MAC_OPS, _node_macs, tensor_shapes

    shapes = tensor_shapes(inferred_shapes(with_fixed_inputs(model, input_shapes)))
    constants = {t.name: t for t in model.graph.initializer}
    producers = {out: node for node in model.graph.node for out in node.output}

    def constant_bits(name: str) -> int | None:
        if name not in constants:
            return None
        values = numpy_helper.to_array(constants[name])
        return integer_bits(values) if values.dtype.kind in "iu" else FLOAT_BITS

    def operand_bits(name: str) -> int:
        bits = constant_bits(name)
        if bits is not None:
            return bits
        producer = producers.get(name)
        if producer is None:
            return FLOAT_BITS
        if producer.op_type == "DequantizeLinear":
            bits = constant_bits(producer.input[0])
            return bits if bits is not None else bits_a
        return bits_a if producer.op_type in ("QuantizeLinear", "DynamicQuantizeLinear") else FLOAT_BITS

    macs = total = quantized = unknown = 0
    for node in model.graph.node:
        if node.op_type not in MAC_OPS:
            continue
        count = _node_macs(node, shapes)
        if count is None:
            unknown += 1
            continue
        first, second = (operand_bits(node.input[i]) for i in MAC_OPERANDS.get(node.op_type, (0, 1)))
        macs += count
        total += count * first * second
        quantized += count if first < FLOAT_BITS and second < FLOAT_BITS else 0
    return {"macs": macs, "bops": total, "quantized_mac_fraction": quantized / macs if macs else None,
            "unknown_mac_nodes": unknown}


def bops(macs: int | None, bits_w: int, bits_a: int) -> int | None:
    return None if macs is None else int(macs) * int(bits_w) * int(bits_a)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    return scipy.special.log_softmax(np.asarray(logits, dtype=np.float64), axis=1)


def kl_divergence(reference: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """Per-sample KL(softmax(reference) || softmax(logits)), natural log."""
    log_p, log_q = log_softmax(reference), log_softmax(logits)
    return (np.exp(log_p) * (log_p - log_q)).sum(axis=1)


def top1_agreement(reference: np.ndarray, logits: np.ndarray) -> float:
    return float((np.asarray(reference).argmax(axis=1) == np.asarray(logits).argmax(axis=1)).mean())


def cosine(reference: np.ndarray, outputs: np.ndarray) -> np.ndarray:
    """Per-sample cosine similarity of the flattened output vectors."""
    a = np.asarray(reference, dtype=np.float64).reshape(len(reference), -1)
    b = np.asarray(outputs, dtype=np.float64).reshape(len(outputs), -1)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(axis=1) / np.where(norms == 0, 1.0, norms)


def classifier_fidelity(reference: np.ndarray, logits: np.ndarray, labels: np.ndarray | None) -> dict[str, Any]:
    cos = cosine(reference, logits)
    record: dict[str, Any] = {
        "inputs": len(logits),
        "top1_agreement": top1_agreement(reference, logits),
        "kl_mean": float(kl_divergence(reference, logits).mean()),
        "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
    }
    if labels is not None:
        record["accuracy"] = float((np.asarray(logits).argmax(axis=1) == labels).mean())
    return record


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1e-2) -> np.ndarray:
    """Weights (last entry: bias) of an L2-regularised logistic regression, by L-BFGS."""
    xb = np.hstack([x, np.ones((len(x), 1))]).astype(np.float64)
    signs = np.where(y > 0, 1.0, -1.0)

    def loss(w: np.ndarray) -> tuple[float, np.ndarray]:
        margin = signs * (xb @ w)
        value = np.logaddexp(0.0, -margin).mean() + 0.5 * l2 * (w[:-1] @ w[:-1])
        grad = xb.T @ (-signs * scipy.special.expit(-margin)) / len(xb)
        grad[:-1] += l2 * w[:-1]
        return value, grad

    result = scipy.optimize.minimize(loss, np.zeros(xb.shape[1]), jac=True, method="L-BFGS-B")
    return result.x


def predict_logistic(weights: np.ndarray, x: np.ndarray) -> np.ndarray:
    return (np.hstack([x, np.ones((len(x), 1))]) @ weights > 0).astype(np.int64)


def embedding_fidelity(reference: np.ndarray, outputs: np.ndarray, labels: np.ndarray | None, train_size: int) -> dict[str, Any]:
    cos = cosine(reference, outputs)
    record: dict[str, Any] = {"inputs": len(outputs), "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min())}
    if labels is not None and 0 < train_size < len(labels):
        weights = fit_logistic(reference[:train_size], labels[:train_size])
        ref_pred = predict_logistic(weights, reference[train_size:])
        pred = predict_logistic(weights, outputs[train_size:])
        record["accuracy"] = float((pred == labels[train_size:]).mean())
        record["top1_agreement"] = float((pred == ref_pred).mean())  # same decision as FP32
    return record
