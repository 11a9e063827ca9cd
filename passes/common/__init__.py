"""Shared layer library of the passes: op catalog, layer geometry, BN statistics, channel
bookkeeping and quantization numerics.

Every pass family (bn_fold, quantize, red, rex, power_quant, equalize, modular) imports what
it shares from here, never from another family's module.
"""
