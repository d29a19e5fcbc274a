"""Batch jobs over the model artifact: the nightly top-K lists."""
