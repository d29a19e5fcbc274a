"""Evaluation: ranking metrics, protocols, baselines, reports."""
