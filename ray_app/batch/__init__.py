"""The nightly stage: every user's top-K lists, precomputed with Ray Data."""
