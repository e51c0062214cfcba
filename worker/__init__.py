"""The worker: consumes jobs, computes per-job results, uploads them, acks last."""
