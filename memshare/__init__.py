"""The memshare core: block pool, KV manager, scheduler, policies, sketches (numpy + stdlib).

Also the request type, the policy seam and registry, MinHash, chained block hashes, atomic
writes, input errors and the policy benchmark; the policies themselves are in
:mod:`memshare.policies`. Nothing here imports SimPy or torch.
"""

__version__ = "0.1.0"
