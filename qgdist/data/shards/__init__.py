"""The on-disk sample format: WebDataset tar shards of jet chunks (schema 2) plus a ``manifest.json``."""

from qgdist.data.shards.schema import (SCHEMA_VERSION, CloudChunk, CloudSample, ImageChunk, ImageSample, JetChunk,
                                       decode_chunk)

__all__ = ["SCHEMA_VERSION", "CloudChunk", "CloudSample", "ImageChunk", "ImageSample", "JetChunk", "decode_chunk"]
