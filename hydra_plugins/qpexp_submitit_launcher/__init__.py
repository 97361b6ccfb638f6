"""qpexp's SLURM launcher (``hydra/launcher=slurm``): hydra-submitit-launcher's, with lost jobs reported."""
