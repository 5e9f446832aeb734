"""The on-disk sample format: WebDataset tar shards plus a ``manifest.json``."""

from qgdist.data.shards.schema import SCHEMA_VERSION, CloudSample, ImageSample, decode_sample, encode_sample

__all__ = ["SCHEMA_VERSION", "CloudSample", "ImageSample", "decode_sample", "encode_sample"]
