"""Shared machinery of b2t-bench that is not a model: data, batching, training loop, metrics, results."""
