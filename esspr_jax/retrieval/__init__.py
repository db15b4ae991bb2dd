"""Retrieval: metrics, exact/ScaNN search, embedding, the eval table, export and search.

Modules are imported on use (ScaNN, matplotlib and tensorboardX are heavy); see
docs/retrieval.md for the protocol and the entry points.
"""
