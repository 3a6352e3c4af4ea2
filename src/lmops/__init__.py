"""lmops: a DVC + Prefect + MLflow pipeline for small translation language models."""

__version__ = "0.1.0"
