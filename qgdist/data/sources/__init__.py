"""Streaming readers of the two public source formats."""
