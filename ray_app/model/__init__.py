"""Re-ranker model: item text tower, user tower, scorer, artifact save/load."""
