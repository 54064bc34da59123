"""``memshare capture``: real KV traces from a real model (generated or teacher-forced).

Importing this package does not import torch or transformers; the HF backend imports them
when it loads a model. Modules: ``base`` (backend protocol), ``hf`` (HF backend),
``model_cache`` (GGUF -> safetensors cache), ``inputs`` (problem sets and texts), ``segment``
(reasoning steps), ``fullkv`` (optional full-KV shards), ``run`` (the capture loop),
``similarity`` (``inspect --similarity``), ``bench`` (``bench capture``).
"""

from memshare.traces.capture.base import CaptureBackend, CapturedRequest, GenerationSettings
from memshare.traces.capture.run import CaptureOptions, CaptureProgress, capture

__all__ = [
    "CaptureBackend",
    "CaptureOptions",
    "CaptureProgress",
    "CapturedRequest",
    "GenerationSettings",
    "capture",
]
