"""Shared layer library of the passes: op catalog (ops), layer geometry (layers), BN statistics
(statistics, batchnorm), channel bookkeeping (channels, channel_permutation, absorb) and what
the quantizers share (numerics, emit, operators, ranges, calibration, quantization), and the
greedy nested-rung knapsack of the network-wide REx allocations (knapsack).

Every pass family (bn_fold, quantize, red, rex, power_quant, equalize, modular) imports what
it shares from here, never from another family's module; nothing here imports a pass family.
"""
