"""Export a PyTorch module to ONNX with every BatchNormalization node preserved.

Both torch exporters fold Conv→BN by default, which destroys the BN statistics that
data-free quantization needs and hides the BNs that onnxopt's folding pass handles
exactly.  With torch 2.x the TorchScript exporter keeps them when asked to preserve
the training mode of the (eval-mode) module and to skip its own constant folding.

torch is imported lazily: it is an optional dependency (``pip install onnxopt[test]``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from .errors import OnnxoptError
from .output import check_output_path, publish, staging_folder


def export_torch(
    module: Any,
    sample_inputs: Any,
    path: str | os.PathLike[str],
    *,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_batch: bool = True,
    opset: int = 17,
) -> Path:
    """Export ``module`` (put in eval mode) to ``path`` keeping BatchNormalization nodes.

    ``sample_inputs`` is a tensor or a tuple of tensors.  With ``dynamic_batch`` the
    first axis of every input and output is exported as a symbolic ``batch`` dimension.
    The file is written atomically; the returned path is the written file.
    """
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise OnnxoptError(
            "export_torch needs PyTorch: pip install 'onnxopt[test]' (torch==2.13.0)"
        ) from exc

    if not isinstance(sample_inputs, tuple):
        sample_inputs = (sample_inputs,)
    n_inputs = len(sample_inputs)
    input_names = list(input_names or (["input"] if n_inputs == 1 else [f"input_{i}" for i in range(n_inputs)]))
    if len(input_names) != n_inputs:
        raise OnnxoptError(f"export_torch: {len(input_names)} input names for {n_inputs} inputs")
    module = module.eval()
    with torch.no_grad():
        sample_outputs = module(*sample_inputs)
    n_outputs = len(sample_outputs) if isinstance(sample_outputs, (tuple, list)) else 1
    output_names = list(output_names or (["output"] if n_outputs == 1 else [f"output_{i}" for i in range(n_outputs)]))

    dynamic_axes = None
    if dynamic_batch:
        dynamic_axes = {name: {0: "batch"} for name in [*input_names, *output_names]}

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    check_output_path(path, what="export")
    with staging_folder(path) as staging:
        staged = staging / path.name
        torch.onnx.export(
            module,
            sample_inputs,
            str(staged),
            dynamo=False,
            training=torch.onnx.TrainingMode.PRESERVE,
            do_constant_folding=False,
            opset_version=opset,
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=dynamic_axes,
        )
        publish(staged)
        os.replace(staged, path)
    return path
