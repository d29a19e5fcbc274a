"""LM re-ranking for recommender systems on Ray."""

__version__ = "0.1.0"
