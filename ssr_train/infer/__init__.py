"""Inference: evaluation, metrics, prediction writers, plots."""
