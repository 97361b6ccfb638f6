"""Experiment tracking: loggers (CSV, W&B) and W&B workspace views."""
