"""Inference: a trained checkpoint scores jets it never saw.

``evaluate`` (one split of a converted dataset: metrics table, ROC, per-jet scores), ``predict`` (any data, raw
files or shards, on Ray Data actors) and ``export`` (ONNX, checked with onnxruntime). Each rebuilds the model from
the checkpoint's own model config and applies the checkpoint's preprocessing, never the scored data's.
"""
