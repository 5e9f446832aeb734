"""Shared low-level helpers every stage may use: typed configs and their flags, atomic writes, storage paths,
device resolution, Ray start/join and the tracking URI. Nothing here imports a pipeline stage."""
