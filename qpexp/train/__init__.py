"""Model training: the Lightning stages, distillation, the optimizer, and the DDP collectives."""
