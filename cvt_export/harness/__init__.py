"""Accuracy and latency harness: inputs -> runners -> metrics -> report."""
