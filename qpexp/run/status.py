"""A finished run's record statuses (standard library only: ``qpexp-frontier`` reads it)."""

# statuses of a finished run whose accuracy stands (deploy_*: the fake-quantized model is fine, its
# deployment is not; the point stays on the front, is listed with its status, and a re-run reuses it)
ACCURACY_STANDS = ("ok", "not_deployed", "deploy_mismatch", "deploy_error")
