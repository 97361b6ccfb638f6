"""Analyses of a trained model: per-layer sensitivity and mixed-precision bit assignment."""
