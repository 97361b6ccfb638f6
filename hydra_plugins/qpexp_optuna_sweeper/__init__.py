"""qpexp's Hydra sweeper for multi-objective search with Optuna (``hydra/sweeper=qpexp_optuna``)."""
