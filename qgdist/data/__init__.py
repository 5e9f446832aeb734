"""Ingest (source readers, shard format, Ray Data conversion) and the training-time loader."""
