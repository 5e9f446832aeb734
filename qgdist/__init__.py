"""qgdist: distributed streaming quark/gluon jet tagging.

Pipeline stages, each a subpackage that imports only the stages before it:
``generate`` -> ``data`` -> ``models`` -> ``track`` -> ``train`` -> ``cluster``.
``qgdist.cli`` and ``qgdist.bench`` sit on top.
"""

__version__ = "0.1.0"
