"""Distributed fine-tuning with Ray Train."""
