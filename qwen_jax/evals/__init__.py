"""Evaluations beyond loss: long-context retrieval (`niah`)."""
