"""weight-only: block-wise low-bit weights in ONNX Runtime's ``com.microsoft.MatMulNBits``.

Before::   x[…, K] ── MatMul(W[K, N]) ── y          x[M, K] ── Gemm(B, C; transB, alpha, beta) ── y
After::    x[…, K] ── MatMulNBits(B_packed, scales, zero_points[, bias]) ── y

Activations stay float; only the constant weight of every ``MatMul`` (x × W) and ``Gemm``
is stored at ``weight_bits`` (4; also 2 and 8) in blocks of ``block_size`` (32; 16–256)
consecutive K rows per output column, each with a float scale and — unless ``symmetric`` —
a uint8 zero point (:mod:`.blockwise` has the layout and the quantizers).  Decoding one
token at batch 1 reads every weight once, so latency follows the weight bytes; ONNX Runtime's
CPU kernels (MLAS) dequantize block by block inside the product.

* ``scale_search`` (default True): per-block clipping search minimising the weight
  reconstruction error (never worse than round to nearest, block by block); False: round to
  nearest, as ONNX Runtime's own ``MatMulNBitsQuantizer`` does by default.
* ``norm_weighting`` (default True): where a LayerNormalization / RMSNormalization (γ, β
  constants, last axis) produces x, the search minimises Σ_k E[x_k²]·(W_kn − Ŵ_kn)² with
  the data-free E[x_k²] ≈ γ_k² + β_k² — the expected output error, not the weight error —
  (the reported errors stay unweighted, so there the chosen one can exceed round to nearest's).
* ``calibration_data`` (CLI ``--calibration-data`` with ``--quantize wN``; an .npz, .npy files
  or images, :mod:`..common.calibration`): E[x_k²] of every layer's input measured on the
  samples in one ONNX Runtime session (:mod:`.calibration`) replaces the data-free row
  weights, for every layer (also the residual order's); ``calibration_mask`` ("auto":
  the ``attention_mask`` input) leaves padding positions out.  The stats say per layer where
  its row weights came from (``row_weights``: "layernorm", "calibration" or null).
* ``zero_points`` (default "uint8"; CLI ``--zero-points float``): "float" stores float32
  zero points fitted by least squares (lower weight error; ONNX Runtime's CPU kernel leaves its
  fast path for them at every accuracy_level, and refuses them at 8 bits, so 8-bit layers and
  the residual order keep uint8).
* ``keep_8bit``: node-name (or weight-name) substrings of layers kept at 8 bits, e.g.
  ``["lm_head", "embed"]``; ``accuracy_level`` is the op's attribute (default 4: int8
  activations inside the kernel, ORT's CPU fast path; 0: float products, slower — for 2- and
  8-bit weights much slower than the float model — and slightly more exact).
* Gemm: ``transB`` reads B as [N, K] (transposed before quantizing), ``alpha`` scales the
  weight, ``beta·C`` of shape [N] (or [1, N] or a scalar) becomes the op's bias input.
  Refused with the reason: Gemm with ``transA``, a bias C of another shape or not constant.
* Refused (counted in the coverage line): weights that are not float32 initializers,
  weights of rank ≠ 2, a constant left operand, inputs whose rank is unknown or < 2, and
  layers inside If/Loop/Scan bodies (only the main graph is rewritten).
  A weight read by several layers is quantized once and shared.

* ``rex_budget`` (default 0: off): REx's residual order in MatMulNBits form
  (:mod:`.residual`): a second MatMulNBits (``rex_bits`` wide, 4 by default) over the output
  columns whose weighted base error is largest, added onto the base output (ScatterElements
  with ``reduction="add"``, opset ≥ 16; an Add when it covers all N columns), in blocks of
  ``rex_block_size`` (default: 128 with the network allocation — a 2-bit column's scales
  are a large share of its bytes, and longer blocks removed more error per byte on both
  benchmark models —, the base's ``block_size`` with ``"layer"``).  The budget is
  a fraction of the base's weight bytes; with a residual as wide as the base, 1.0 is a full
  second order.  ``rex_allocation="network"`` (default) spends it over the whole model where
  a 2-bit (or ``rex_bits``-wide) residual column removes the largest share of its layer's
  error per byte (two passes over the weights: per-column error tables, then the chosen
  residuals; :mod:`.residual`), ``"layer"`` the same share in every layer.  There the
  residual has no zero points (``rex_symmetric``) and the base codes of its columns are
  rounded together with it (``rex_joint``: one finer grid; :func:`.residual.joint_rounding`).  Layers kept at
  8 bits get none; a budget that buys no column anywhere is exit 10 (nothing the option asked
  for was done).

The stats list per layer the bits, block size, zero point type and relative weight error ‖W − Ŵ‖/‖W‖ of
round to nearest and of the chosen quantization.  Memory: the matching reads only types and shapes; each weight is loaded when its turn comes,
copied once (transposed, padded, float32) while it is quantized — the search's temporaries
are bounded by :data:`.blockwise.CHUNK_ELEMENTS` — and only its packed bytes are kept.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.errors import NothingToDoError, PipelineError
from onnxopt.graph import NameFactory, all_graphs, cleanup, detach, is_default_domain, node_label
from onnxopt.options import OptionProblem, option
from onnxopt.pass_base import Pass, PassContext, PassResult, Refusal, Stage

from ..common.calibration import CalibrationOptions, calibration_samples
from ..common.ops import MATRIX_OPS
from .blockwise import SUPPORTED_BITS, SUPPORTED_BLOCK_SIZES, BlockQuantized, pack_codes, packed_tensors, quantize_blocks
from .calibration import measured_row_weights, token_mask_input
from .kernels import slow_nodes
from .layers import Layer, norm_statistics, plan_gemm, plan_matmul
from .residual import MIN_OPSET as REX_MIN_OPSET
from .residual import (
    Allocation,
    ColumnTable,
    Residual,
    allocate_network,
    budget_columns,
    packed_base_columns,
    error_table,
    residual_of_columns,
    residual_order,
    rung_bits,
)

DOMAIN = "com.microsoft"
ACCURACY_LEVELS = (0, 1, 2, 3, 4)
#: Why a layer stayed float: reason prefix -> short label of the coverage line.
FLOAT_LABELS = (
    ("weight is not a constant", "activation × activation"),
    ("constant left operand", "constant left operand"),
    ("weight is not float32", "non-float32 weight"),
    ("weight of rank", "weight rank ≠ 2"),
    ("input rank", "input rank unknown or < 2"),
    ("Gemm", "Gemm form"),
    ("inside a control-flow body", "inside If/Loop/Scan"),
)
#: Why a MatMul/Gemm of an If/Loop/Scan body is not rewritten.
NESTED_REASON = "inside a control-flow body (If/Loop/Scan): weight-only rewrites the main graph's layers only"


@dataclass
class Packed:
    """A quantized weight as stored (the MatMulNBits constants) and its errors; the codes
    are not kept, so only the packed bytes of the weights done so far stay in memory."""

    bits: int
    block_size: int
    symmetric: bool
    rtn_relative_error: float
    relative_error: float
    float_bytes: int
    constants: list[gs.Constant]
    #: The residual order (REx): its MatMulNBits constants, output columns and width.
    rex_constants: list[gs.Constant] | None = None
    rex_columns: gs.Constant | None = None
    rex_bits: int = 0
    rex_block_size: int = 0
    rex_count: int = 0
    rex_full: bool = False
    rex_relative_error: float | None = None
    #: Why the layer has no residual order although one was asked for.
    rex_skipped: str | None = None

    @property
    def nbytes(self) -> int:
        return int(sum(c.values.nbytes for c in self.constants))

    @property
    def zero_point_type(self) -> str | None:
        """"uint8" or "float" (the third constant's type), None when symmetric."""
        return None if len(self.constants) < 3 else ("float" if self.constants[2].values.dtype.kind == "f" else "uint8")

    @property
    def rex_nbytes(self) -> int:
        return int(sum(c.values.nbytes for c in self.rex_constants or ()))


KEPT_8BIT_NO_RESIDUAL = "kept at 8 bits (keep_8bit): no residual order"
#: The residual order's default block size under rex_allocation="network" (see rex_block_size).
NETWORK_REX_BLOCK_SIZE = 128

@dataclass(frozen=True)
class WeightOnlyOptions(CalibrationOptions):
    """weight-only's options: bits, block size, zero points, the scale search (its row
    weights data-free or measured on ``calibration_data``) and the residual order (REx in
    MatMulNBits form)."""

    weight_bits: int = option(4, flag="--quantize")
    #: K rows per scale
    block_size: int = option(32, flag="--block-size")
    #: no zero points
    symmetric: bool = option(False, flag="--symmetric")
    #: "float": float32 zero points fitted by least squares (lower error, off ORT's fast CPU kernel)
    zero_points: Literal["uint8", "float"] = option("uint8", flag="--zero-points")
    #: per-block clipping/zero-point search (False: round to nearest)
    scale_search: bool = True
    search_steps: int = 10
    #: the smallest clipping factor the search tries
    min_shrink: float = 0.7
    #: least-squares refits of scale and zero point after the search
    refine_rounds: int = 2
    #: MatMulNBits accuracy_level: 4 (int8 activations inside ORT's CPU kernel) is its fast
    #: path, and the only one for 2- and 8-bit weights; 0 computes float products
    accuracy_level: int = option(4, flag="--accuracy-level")
    #: layers whose node or weight name contains one of these stay at 8 bits
    keep_8bit: tuple[str, ...] | str | None = option((), flag="--keep-8bit")
    #: weight the rows by the LayerNorm (γ² + β²) feeding the layer
    norm_weighting: bool = True
    #: with calibration_data: the [batch, tokens] graph input whose zeros mark padding left out of E[x²] ("auto": attention_mask; "none")
    calibration_mask: str | None = "auto"
    #: residual order's bytes as a fraction of the base's (0: none; 1.0 at 4 bits: a full second order)
    rex_budget: float = option(0.0, flag="--rex-budget")
    rex_bits: int = 4
    #: the residual's block size (None: NETWORK_REX_BLOCK_SIZE with the network allocation, the base's with "layer")
    rex_block_size: int | None = None
    #: network: the budget over all layers where it removes most error per byte (2-bit or rex_bits rungs); layer: the same share of every layer at rex_bits
    rex_allocation: Literal["network", "layer"] = option("network", flag="--rex-allocation")
    #: network allocation: the residual without zero points (the middle code; a negative scale flips its levels)
    rex_symmetric: bool = True
    #: network allocation: round the base codes of the residual's columns together with the residual (one finer grid)
    rex_joint: bool = True

    def check(self) -> None:
        super().check()
        if self.weight_bits not in SUPPORTED_BITS:
            raise OptionProblem("weight_bits", f"must be one of {', '.join(map(str, SUPPORTED_BITS))} (MatMulNBits), got {self.weight_bits!r}")
        if self.block_size not in SUPPORTED_BLOCK_SIZES:
            raise OptionProblem("block_size", f"must be one of {', '.join(map(str, SUPPORTED_BLOCK_SIZES))}, got {self.block_size!r}")
        if self.symmetric and self.zero_points == "float":
            raise OptionProblem("zero_points", "cannot be 'float' with symmetric quantization (symmetric stores no zero points): drop one of the two")
        if self.weight_bits == 8 and self.zero_points == "float":
            raise OptionProblem("zero_points", "cannot be 'float' at weight_bits 8: ONNX Runtime's CPU MatMulNBits refuses 8-bit weights with float zero points (use 2 or 4 bits)")
        if self.accuracy_level not in ACCURACY_LEVELS:
            raise OptionProblem("accuracy_level", f"must be one of 0..4, got {self.accuracy_level!r}")
        if self.search_steps < 1:
            raise OptionProblem("search_steps", f"must be an integer >= 1, got {self.search_steps!r}")
        if not 0 < self.min_shrink <= 1:
            raise OptionProblem("min_shrink", f"must be in (0, 1], got {self.min_shrink!r}")
        if self.refine_rounds < 0:
            raise OptionProblem("refine_rounds", f"must be an integer >= 0, got {self.refine_rounds!r}")
        if self.rex_budget < 0:
            raise OptionProblem("rex_budget", f"must be a fraction >= 0 of the base's weight bytes (0.25; 1.0 = a full second order at 4 bits), got {self.rex_budget!r}")
        if self.rex_bits not in SUPPORTED_BITS:
            raise OptionProblem("rex_bits", f"must be one of {', '.join(map(str, SUPPORTED_BITS))}, got {self.rex_bits!r}")
        if self.rex_block_size is not None and self.rex_block_size not in SUPPORTED_BLOCK_SIZES:
            raise OptionProblem("rex_block_size", f"must be one of {', '.join(map(str, SUPPORTED_BLOCK_SIZES))} (or unset: the base's), got {self.rex_block_size!r}")
        if self.calibration_mask not in ("auto", "none", None) and not self.calibration_data:
            raise OptionProblem("calibration_mask", "names the token mask of the calibration samples; give them with calibration_data")
        if self.rex_budget and self.weight_bits == 8:
            raise OptionProblem("rex_budget", "expands a low-bit base; at weight_bits 8 the base is already finer than a residual order (use weight_bits 4)")


class WeightOnlyQuantize(Pass):
    name = "weight-only"
    summary = "weight-only block-wise 2/4/8-bit quantization of MatMul/Gemm weights to ONNX Runtime's MatMulNBits (float activations)"
    stage = Stage.QUANTIZE
    lossless = False
    tags = frozenset({"weight-only"})
    request = "weight-only"
    #: The op lives in com.microsoft (version 1) and needs no newer default-domain op.
    min_opset = None
    Options = WeightOnlyOptions

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        if self.options["rex_budget"] > 0:
            self.min_opset = REX_MIN_OPSET  # the partial residual order's ScatterElements(reduction="add")

    def requires(self, graph: gs.Graph, ctx: PassContext) -> None:
        self._keep = keep_patterns(self.options["keep_8bit"])

    # ------------------------------------------------------------------ main
    def call(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        candidates = [n for n in graph.nodes if n.op in MATRIX_OPS and is_default_domain(n)]
        self._reasons: Counter[str] = Counter()
        self._matched: set[str] = set()
        layers = [layer for layer in (self._plan(node, ctx) for node in candidates) if layer is not None]
        nested = self._refuse_nested(graph, ctx)
        calibration = self._calibrate(graph, layers, ctx) if self.options["calibration_data"] and layers else {}
        names = NameFactory(graph)
        done: dict[tuple[Any, ...], Packed] = {}
        records = []
        self._allocation: Allocation | None = None
        if self.options["rex_budget"] and self.options["rex_allocation"] == "network":
            self._quantize_network(graph, layers, done, records, names, ctx)
        else:
            self._quantize_each(graph, layers, done, records, names, ctx)
        unmatched = [p for p in self._keep if p not in self._matched]
        for pattern in unmatched:
            ctx.refuse(f"keep_8bit {pattern!r}", "matches no quantized MatMul/Gemm (node or weight name): nothing kept at 8 bits for it")
        if layers:
            cleanup(graph)
        before = sum(packed.float_bytes for packed in done.values())
        after = sum(packed.nbytes + packed.rex_nbytes for packed in done.values())
        rex = self._rex_summary(done.values(), records)
        return PassResult(
            bool(layers),
            {
                "layers_quantized": len(layers),
                "weights_quantized": len(done),
                "layers_8bit": sum(1 for r in records if r["bits"] == 8 and self.options["weight_bits"] != 8),
                **({"keep_8bit_unmatched": unmatched} if unmatched else {}),
                **calibration,
                "layers_row_weights": dict(Counter(r["row_weights"] or "none" for r in records)),
                "weight_bytes_before": before,
                "weight_bytes_after": after,
                **rex,
                **summarize_errors(records),
                "coverage": self._coverage(len(candidates) + nested, len(layers), records),
                "layers": records,
            },
        )

    def nothing_done(self, result: PassResult, refusals: list[Refusal]) -> str:
        coverage = result.stats.get("coverage")
        if coverage is None:
            return super().nothing_done(result, refusals)
        if not coverage["total"]:
            return f"{self.name}: the model has no MatMul or Gemm layer (weight-only quantization rewrites x × W with a constant W)"
        reasons = ", ".join(f"{n} {label}" for label, n in Counter(coverage["reasons"]).most_common())
        return (
            f"{self.name}: 0 of {coverage['total']} MatMul/Gemm layers quantized: {reasons}; only x × W with W a constant "
            "float32 initializer is rewritten (run the default passes first so Transpose(W) and similar fold into initializers)"
        )

    # ------------------------------------------------------------------ pieces
    def _plan(self, node: gs.Node, ctx: PassContext) -> Layer | None:
        plan = plan_matmul(node) if node.op == "MatMul" else plan_gemm(node)
        if isinstance(plan, str):
            ctx.refuse(f"layer {node_label(node)}", plan)
            self._reasons[float_label(plan)] += 1
            return None
        if self.options["norm_weighting"]:
            found = norm_statistics(node.inputs[0], plan.k)
            if found is not None:
                plan.norm, plan.row_weight = found
                plan.row_source = "layernorm"
        return plan

    def _refuse_nested(self, graph: gs.Graph, ctx: PassContext) -> int:
        """MatMul/Gemm layers inside If/Loop/Scan bodies stay float (only the main graph is
        rewritten): each is counted with the reason, so a model whose layers all sit in a
        body is told why nothing was quantized.  Returns their count."""
        nested = [n for body in all_graphs(graph)[1:] for n in body.nodes if n.op in MATRIX_OPS and is_default_domain(n)]
        for node in nested:
            ctx.refuse(f"layer {node_label(node)}", NESTED_REASON)
            self._reasons[float_label(NESTED_REASON)] += 1
        return len(nested)

    def _calibrate(self, graph: gs.Graph, layers: list[Layer], ctx: PassContext) -> dict[str, Any]:
        """E[x_k²] of every layer's input measured on ``calibration_data`` (one ORT session)
        replaces the LayerNorm-derived row weights (:mod:`.calibration`); the calibration stats."""
        model = ctx.export(graph)
        data = calibration_samples(self.name, self.options, model)
        mask = token_mask_input(model, self.options["calibration_mask"], self.name)
        measured = measured_row_weights(model, [layer.node.inputs[0].name for layer in layers], data.feeds, mask)
        for layer in layers:
            found = measured.get(layer.node.inputs[0].name)
            if found is not None and found.shape == (layer.k,):
                layer.row_weight, layer.norm, layer.row_source = found, layer.node.inputs[0].name, "calibration"
        missed = sum(1 for layer in layers if layer.row_source != "calibration")
        if missed:
            ctx.refuse("calibration", f"{missed} layer(s) got no measured input statistics (input not computed on the samples): "
                                      "they keep the data-free row weights")
        return {**data.stats(), "calibration_mask": mask}

    def _kept(self, node: gs.Node) -> bool:
        """Whether a keep_8bit pattern is in the node's or its weight's name (matches are recorded)."""
        hits = {p for p in self._keep if p in (node.name or "") or p in node.inputs[1].name}
        self._matched |= hits
        return bool(hits)

    def _search_options(self) -> dict[str, Any]:
        o = self.options
        return {"search": o["scale_search"], "steps": o["search_steps"], "min_shrink": float(o["min_shrink"]), "refine_rounds": o["refine_rounds"]}

    def _quantize_base(self, matrix: np.ndarray, layer: Layer, bits: int) -> BlockQuantized:
        """The block-wise base of one weight (the one place both allocations quantize it)."""
        o = self.options
        return quantize_blocks(matrix, bits, o["block_size"], symmetric=o["symmetric"], row_weight=layer.row_weight,
                               float_zero_points=o["zero_points"] == "float" and bits != 8,  # ORT's CPU kernel: no 8-bit float zero points
                               **self._search_options())

    def _quantize_layer(self, layer: Layer, bits: int, names: NameFactory, ctx: PassContext) -> Packed:
        """The base (and, with ``rex_budget``, the residual order) of one weight, packed."""
        o = self.options
        matrix = layer.matrix()
        result = self._quantize_base(matrix, layer, bits)
        packed = self._pack(result, layer, names)
        if o["rex_budget"]:
            self._add_residual(packed, matrix, result, layer, names, ctx)
        return packed

    def _quantize_each(self, graph: gs.Graph, layers: list[Layer], done: dict[tuple[Any, ...], Packed], records: list[dict[str, Any]],
                       names: NameFactory, ctx: PassContext) -> None:
        """One pass over the layers: each weight quantized (with ``rex_allocation="layer"``,
        its residual order too) and its nodes rewritten."""
        for layer in ctx.progress(layers, total=len(layers), label="layers"):
            bits, key = self._bits_and_key(layer)
            if key not in done:
                done[key] = self._quantize_layer(layer, bits, names, ctx)
            self._rewrite(graph, layer, done[key], names)
            records.append(layer_record(layer, done[key]))
            layer.tensor = None  # type: ignore[assignment]  # the float weight can go once no node reads it

    def _quantize_network(self, graph: gs.Graph, layers: list[Layer], done: dict[tuple[Any, ...], Packed], records: list[dict[str, Any]],
                          names: NameFactory, ctx: PassContext) -> None:
        """``rex_allocation="network"``: the bases and per-column error tables in a first pass
        over the layers, the allocation over the whole model, then each chosen residual from
        its weight read again (only the tables and packed bytes stay between the passes)."""
        o = self.options
        keys, tables = self._bases_and_tables(layers, done, names, ctx)
        budget = float(o["rex_budget"]) * sum(done[key].nbytes for key in tables)
        self._allocation = allocate_network(list(tables.values()), budget)
        chosen = dict(zip(tables, self._allocation.choices))
        if tables and not any(chosen.values()):
            cheapest = min(t.costs[0] for t in tables.values())
            reason = (f"rex_budget {o['rex_budget']:g} of the bases' bytes ({budget:.0f} bytes over all layers) buys no residual column "
                      f"(the cheapest, {rung_bits(o['rex_bits'])[0]}-bit, takes {cheapest} bytes): raise rex_budget")
            for key in tables:
                done[key].rex_skipped = reason
        handled: set[tuple[Any, ...]] = set()
        for layer, key in zip(layers, keys):
            packed = done[key]
            if key not in handled:  # a shared weight: its residual once
                handled.add(key)
                if chosen.get(key) is not None:
                    self._network_residual(packed, layer, tables[key], *chosen[key], names)
                elif not packed.rex_skipped:
                    packed.rex_skipped = (f"network allocation: rex_budget {o['rex_budget']:g} went to layers where a residual removes more "
                                          "of their relative error per byte")
                if packed.rex_skipped:
                    ctx.refuse(f"residual order of {node_label(layer.node)}", packed.rex_skipped)
            self._rewrite(graph, layer, packed, names)
            records.append(layer_record(layer, packed))
            layer.tensor = None  # type: ignore[assignment]

    def _bases_and_tables(self, layers: list[Layer], done: dict[tuple[Any, ...], Packed], names: NameFactory,
                          ctx: PassContext) -> tuple[list[tuple[Any, ...]], dict[tuple[Any, ...], ColumnTable]]:
        """The first pass of the network allocation: each weight's packed base and (unless
        kept at 8 bits) its per-column error table; the layers' weight keys."""
        o = self.options
        keys, tables, readers = [], {}, Counter()
        for layer in ctx.progress(layers, total=len(layers), label="layers (bases, error tables)"):
            bits, key = self._bits_and_key(layer)
            keys.append(key)
            readers[key] += 1
            if key in done:
                continue
            matrix = layer.matrix()
            result = self._quantize_base(matrix, layer, bits)
            done[key] = self._pack(result, layer, names)
            if bits == 8:
                done[key].rex_skipped = KEPT_8BIT_NO_RESIDUAL
            else:
                tables[key] = error_table(matrix, result, rung_bits(o["rex_bits"]), self._network_block_size(), layer.row_weight,
                                          symmetric=o["rex_symmetric"], joint=o["rex_joint"], **self._search_options())
            del matrix, result
        for key, table in tables.items():
            table.readers = readers[key]
        return keys, tables

    def _bits_and_key(self, layer: Layer) -> tuple[int, tuple[Any, ...]]:
        """The layer's weight bits (8 when ``keep_8bit`` names it) and the key under which its
        quantized weight is shared (the same weight, bits and input statistics)."""
        bits = 8 if self._kept(layer.node) else self.options["weight_bits"]
        return bits, (*layer.key, bits, layer.norm)

    def _network_block_size(self) -> int:
        """The residual's block size under the network allocation."""
        return self.options["rex_block_size"] or NETWORK_REX_BLOCK_SIZE

    def _network_residual(self, packed: Packed, layer: Layer, table: ColumnTable, bits: int, columns: Any, names: NameFactory) -> None:
        """The second pass for one weight: read it again, decode the base on ``columns`` from
        its packed constants and quantize their residual at ``bits``."""
        o = self.options
        b, scales = (c.values for c in packed.constants[:2])
        zero_points = packed.constants[2].values if len(packed.constants) > 2 else None
        base = packed_base_columns(b, scales, zero_points, columns, bits=packed.bits, block_size=packed.block_size)
        residual = residual_of_columns(layer.matrix(), base, columns, bits, table.block_size, table.plain, table.symmetric,
                                       layer.row_weight, joint=o["rex_joint"], **self._search_options())
        if residual.base_codes is not None:  # the base codes of these columns were rounded with the residual
            b[columns] = pack_codes(residual.base_codes, packed.bits)
        self._pack_residual(packed, residual, layer, names)
        packed.rex_relative_error = float(np.sqrt(residual.sq_error / max(table.sq_norm, 1e-30)))

    def _add_residual(self, packed: Packed, matrix: np.ndarray, base: BlockQuantized, layer: Layer, names: NameFactory, ctx: PassContext) -> None:
        """The residual order of the columns ``rex_budget`` pays for (or why there is none)."""
        o = self.options
        if base.bits == 8:
            packed.rex_skipped = KEPT_8BIT_NO_RESIDUAL
        else:
            count = budget_columns(layer.k, layer.n, float(o["rex_budget"]), base.bits, o["rex_bits"], base.block_size, base.symmetric, o["rex_block_size"])
            if count == 0:
                packed.rex_skipped = (f"rex_budget {o['rex_budget']:g} of the base's bytes buys no {o['rex_bits']}-bit residual column "
                                      f"of this layer (N = {layer.n}): raise rex_budget")
        if packed.rex_skipped:
            ctx.refuse(f"residual order of {node_label(layer.node)}", packed.rex_skipped)
            return
        residual = residual_order(matrix, base, count, o["rex_bits"], layer.row_weight, o["rex_block_size"], **self._search_options())
        self._pack_residual(packed, residual, layer, names)
        packed.rex_relative_error = float(np.sqrt(residual.sq_error / max(base.sq_norm, 1e-30)))

    def _pack_residual(self, packed: Packed, residual: Residual, layer: Layer, names: NameFactory) -> None:
        base = layer.tensor.name
        b, scales, zero_points = packed_tensors(residual.quantized)
        constants = [gs.Constant(names.new(f"{base}_rex_Q{residual.quantized.bits}"), b), gs.Constant(names.new(f"{base}_rex_scales"), scales)]
        if zero_points is not None:
            constants.append(gs.Constant(names.new(f"{base}_rex_zero_points"), zero_points))
        packed.rex_constants = constants
        packed.rex_bits = residual.quantized.bits
        packed.rex_block_size = residual.quantized.block_size
        packed.rex_count = int(residual.columns.size)
        packed.rex_full = residual.full
        if not residual.full:
            packed.rex_columns = gs.Constant(names.new(f"{base}_rex_columns"), residual.columns)

    def _pack(self, result: BlockQuantized, layer: Layer, names: NameFactory) -> Packed:
        """B, scales and (unless symmetric) zero points as fresh constants, and the errors."""
        base = layer.tensor.name
        b, scales, zero_points = packed_tensors(result)
        constants = [gs.Constant(names.new(f"{base}_Q{result.bits}"), b), gs.Constant(names.new(f"{base}_scales"), scales)]
        if zero_points is not None:
            constants.append(gs.Constant(names.new(f"{base}_zero_points"), zero_points))
        return Packed(result.bits, result.block_size, result.symmetric, result.rtn_relative_error, result.relative_error,
                      layer.k * layer.n * 4, constants)

    def _rewrite(self, graph: gs.Graph, layer: Layer, packed: Packed, names: NameFactory) -> None:
        node = layer.node
        inputs: list[gs.Tensor] = [node.inputs[0], *packed.constants]
        if layer.bias is not None:
            inputs += [gs.Variable.empty()] * (5 - len(inputs))  # zero_points and g_idx absent
            inputs.append(gs.Constant(names.new(f"{node_label(node)}_bias"), layer.bias))
        attrs = {"K": layer.k, "N": layer.n, "bits": packed.bits, "block_size": packed.block_size, "accuracy_level": int(self.options["accuracy_level"])}
        output, x = node.outputs[0], node.inputs[0]
        fused = gs.Node("MatMulNBits", names.new(f"{node_label(node)}_Q{packed.bits}"), attrs=attrs, inputs=inputs, outputs=[], domain=DOMAIN)
        detach(node)
        if packed.rex_constants is None:
            fused.outputs.append(output)
            graph.nodes.append(fused)
            return
        label = node_label(node)
        base_out = gs.Variable(names.new(f"{label}_base"), dtype=output.dtype)
        fused.outputs.append(base_out)
        rex_attrs = {**attrs, "N": packed.rex_count, "bits": packed.rex_bits, "block_size": packed.rex_block_size}
        rex_out = gs.Variable(names.new(f"{label}_rex"), dtype=output.dtype)
        rex = gs.Node("MatMulNBits", names.new(f"{label}_rex_Q{packed.rex_bits}"), attrs=rex_attrs,
                      inputs=[x, *packed.rex_constants], outputs=[rex_out], domain=DOMAIN)
        graph.nodes += [fused, rex, *residual_join(base_out, rex_out, packed.rex_columns, output, label, names)]

    def _rex_summary(self, packed: Any, records: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """The residual order's counted lines (empty when not asked for); exit 10 when the
        budget bought no column in any layer."""
        if not self.options["rex_budget"]:
            return {}
        done = [p for p in packed if p.rex_constants is not None]
        expanded = [r for r in records if r.get("rex_columns")]
        if records and not expanded:
            reasons = Counter(p.rex_skipped for p in packed if p.rex_skipped)
            raise NothingToDoError(f"{self.name}: rex_budget {self.options['rex_budget']:g} added no residual order to any of the "
                                   f"{len(records)} quantized layers: " + "; ".join(reasons))
        base_bytes = sum(p.nbytes for p in packed if p.bits != 8)
        allocation = self._allocation
        network = {} if allocation is None else {
            "rex_budget_bytes": int(allocation.budget),
            # the greedy's relative-error reduction with mixed rungs per layer, and the share one residual per layer keeps of it
            "rex_network_gain": round(allocation.greedy_gain, 6),
            "rex_one_rung_kept": round(allocation.kept_gain / allocation.greedy_gain, 4) if allocation.greedy_gain else 1.0,
            "rex_mixed_layers": allocation.mixed_layers,
            "rex_bits_layers": dict(sorted(Counter(r["rex_bits"] for r in expanded).items())),
        }
        return {
            "rex_allocation": self.options["rex_allocation"],
            **network,
            "rex_layers": len(expanded),
            "rex_columns": int(sum(r["rex_columns"] for r in expanded)),
            "rex_columns_share": round(sum(r["rex_columns"] for r in expanded) / max(sum(r["N"] for r in records), 1), 4),
            "rex_bytes": sum(p.rex_nbytes for p in done),
            "rex_bytes_share": round(sum(p.rex_nbytes for p in done) / max(base_bytes, 1), 4),
            "rex_relative_error_mean": round(float(np.mean([r.get("rex_relative_error", r["relative_error"]) for r in records])), 6),
        }

    def _coverage(self, total: int, done: int, records: list[dict[str, Any]]) -> dict[str, Any]:
        """The coverage line's counts, and the nodes written in a form ORT's CPU kernel runs off its fast path."""
        return {"verb": "quantized", "unit": "MatMul/Gemm layers", "done": done, "total": total, "left": "float", "reasons": dict(self._reasons),
                "slow_kernel": slow_nodes(records, int(self.options["accuracy_level"]))}


def keep_patterns(value: Any) -> tuple[str, ...]:
    """``keep_8bit`` as substrings: a list/tuple of strings or one comma-separated string."""
    if value is None:
        return ()
    if isinstance(value, str):
        return tuple(p.strip() for p in value.split(",") if p.strip())
    if isinstance(value, (list, tuple)) and all(isinstance(p, str) for p in value):
        return tuple(p for p in value if p)
    raise PipelineError(f"weight-only: keep_8bit must be a list of node-name substrings, got {value!r}")


def float_label(reason: str) -> str:
    return next((label for prefix, label in FLOAT_LABELS if reason.startswith(prefix)), "other")


def layer_record(layer: Layer, result: Packed) -> dict[str, Any]:
    record = {
        "layer": node_label(layer.node), "op": layer.node.op, "K": layer.k, "N": layer.n, "bits": result.bits,
        "block_size": result.block_size, "symmetric": result.symmetric,
        "zero_points": result.zero_point_type, "row_weights": layer.row_source, "weighted_by": layer.norm,
        "rtn_relative_error": round(result.rtn_relative_error, 6), "relative_error": round(result.relative_error, 6),
    }
    if result.rex_constants is not None:
        record.update(rex_columns=result.rex_count, rex_bits=result.rex_bits, rex_block_size=result.rex_block_size, rex_bytes=result.rex_nbytes,
                      rex_relative_error=round(result.rex_relative_error or 0.0, 6))
    return record


def residual_join(base: gs.Variable, residual: gs.Variable, columns: gs.Constant | None, output: gs.Tensor, label: str, names: NameFactory) -> list[gs.Node]:
    """base + residual: an Add when the residual covers every column, else
    ScatterElements(base, columns expanded to the residual's shape, residual, reduction=add)
    on the last axis."""
    if columns is None:
        return [gs.Node("Add", names.new(f"{label}_rex_add"), inputs=[base, residual], outputs=[output])]
    shape = gs.Variable(names.new(f"{label}_rex_shape"), dtype=np.int64)
    indices = gs.Variable(names.new(f"{label}_rex_indices"), dtype=np.int64)
    return [
        gs.Node("Shape", names.new(f"{label}_rex_shape"), inputs=[residual], outputs=[shape]),
        gs.Node("Expand", names.new(f"{label}_rex_expand"), inputs=[columns, shape], outputs=[indices]),
        gs.Node("ScatterElements", names.new(f"{label}_rex_scatter"), attrs={"axis": -1, "reduction": "add"},
                inputs=[base, indices, residual], outputs=[output]),
    ]


def summarize_errors(records: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Mean relative weight error over layers, round to nearest and chosen."""
    if not records:
        return {}
    return {
        "rtn_relative_error_mean": round(float(np.mean([r["rtn_relative_error"] for r in records])), 6),
        "relative_error_mean": round(float(np.mean([r["relative_error"] for r in records])), 6),
    }


__all__ = ["WeightOnlyQuantize", "plan_gemm", "plan_matmul"]
