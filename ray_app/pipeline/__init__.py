"""The pipeline: every stage in one driver (`rerank pipeline`, `rerank demo`)."""
