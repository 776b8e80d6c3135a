"""HybridMIMSegment engine: masked-image-modelling pre-trained 3D segmentation.

The engine never imports Slicer; the Slicer module runs it as a subprocess
(``python -m hybridmim …``) and reads its JSON-lines progress.
"""

__version__ = "0.1.0"
