"""The figures of the suite: BOPs, fidelity to FP32, labelled accuracy, spam/ham probe.

* BOPs (bit operations) = bits_w x bits_a x MACs, with the configuration's nominal bit-widths
  (an unquantized model: 32 x 32).  MACs come from ``onnxopt.metrics`` (shape inference on
  the configuration's own model, so a pruned model counts fewer); layers a quantizer keeps at
  another width (first/last layer at 8 bits) are counted at the nominal width.
* Fidelity against the FP32 model's outputs on the same real inputs: top-1 agreement, mean
  KL(FP32 || config) of the softmax, cosine similarity of the logit (or embedding) vectors.
* Embedding models: a logistic regression (L2, L-BFGS from scipy) fitted on the FP32
  embeddings of the first half of the labelled inputs, applied unchanged to each
  configuration's embeddings of the second half.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.optimize
import scipy.special


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
