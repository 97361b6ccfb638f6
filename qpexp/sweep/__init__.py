"""Sweeps: Hydra callbacks, the pre-sweep check, frontier aggregation, dashboard and reports."""
