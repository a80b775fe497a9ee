"""Converters from other frameworks' checkpoints into rsjax models (see converters.pytorch)."""
