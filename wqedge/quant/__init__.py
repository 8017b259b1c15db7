"""Quantizers: one affine primitive plus the fitters that choose its parameters."""
