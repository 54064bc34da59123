"""``memshare capture``: real KV traces from a real model (generated or teacher-forced).

Importing this package does not import torch or transformers; the model loader
(:mod:`memshare.traces.model.loader`) imports them when it loads a model. Modules: ``base``
(backend protocol), ``hf`` and ``vllm`` (the backends), ``options`` (what capture takes,
read from :mod:`memshare.traces.inputs`), ``run`` (the capture loop), ``resume`` (the output
directory, resume checks), ``template`` (the manifest template), ``rows`` (a request's KV
rows and steps), ``fullkv`` (optional full-KV shards), ``similarity`` (``inspect
--similarity``), ``bench`` (``bench capture``).
"""

from memshare.traces.capture.base import CaptureBackend, CapturedRequest, GenerationSettings
from memshare.traces.capture.options import CaptureOptions, CaptureProgress
from memshare.traces.capture.run import capture

__all__ = [
    "CaptureBackend",
    "CaptureOptions",
    "CaptureProgress",
    "CapturedRequest",
    "GenerationSettings",
    "capture",
]
