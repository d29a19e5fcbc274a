"""Data: the prepare and generate stages, and what every layer reads (column names and
schemas, readers, adapters, validation, sequences, negatives, item text)."""
