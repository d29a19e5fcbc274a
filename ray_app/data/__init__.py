"""Data: readers, adapters, validation, sequences, splits, negatives, item text."""
