"""qgdist: distributed streaming quark/gluon jet tagging.

Layers, each importing only those below it (docs/ARCHITECTURE.md; checked with import-linter):
``cli`` > ``bench`` > ``pipelines`` > ``train | cluster`` > ``track | models | generate`` > ``data`` > ``core``.
"""

__version__ = "0.1.0"
