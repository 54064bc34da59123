"""From trace records to what a policy sees: :class:`~memshare.policy.RequestInfo`.

Block identity comes from token ids where the trace has them (chained hashes of full blocks,
prompt and output) and from the source's block hash ids for workload traces (Mooncake: one id
per 512 tokens, chained, the last one covering a partial block). A simulation block size that
divides the source's hash block size splits each source id into derived sub-block ids, which
keeps the prefix-chain property.
"""

from __future__ import annotations

import numpy as np

from memshare.errors import InputError
from memshare.hashing import block_hash, chain_hashes
from memshare.kv_manager import cdiv
from memshare.policy import RequestInfo
from memshare.traces.schema import Manifest, RequestRecord


def default_block_size(manifest: Manifest) -> int:
    """The block size a trace implies: its hash block size if it has one, else its own."""
    return manifest.hash_block_size or manifest.block_size


def request_info(record: RequestRecord, manifest: Manifest, block_size: int) -> RequestInfo:
    """The policy-facing view of one request at ``block_size`` tokens per block."""
    if record.prompt_ids is not None:
        tokens = record.prompt_ids + (record.output_ids or [])
        hashes = chain_hashes(tokens, block_size)
        prompt = np.asarray(record.prompt_ids, dtype=np.int64)
        return RequestInfo(record.id, record.prompt_len, block_size, hashes, prompt_ids=prompt)
    if record.hash_ids is None:
        return RequestInfo(record.id, record.prompt_len, block_size, ())
    hbs = manifest.hash_block_size
    if hbs is None:
        raise InputError(
            "manifest.json",
            "field 'hash_block_size' is missing but requests carry hash_ids",
            "re-import the workload with `memshare import`",
        )
    if block_size == hbs:
        return RequestInfo(record.id, record.prompt_len, block_size, record.hash_ids, True)
    if hbs % block_size:
        raise InputError(
            "--block-size",
            f"{block_size} does not divide the trace's hash block size {hbs}",
            f"use {hbs} or a divisor of it",
        )
    per = hbs // block_size
    n = cdiv(record.prompt_len, block_size)
    hashes = [block_hash(hid, [j]) for hid in record.hash_ids for j in range(per)][:n]
    return RequestInfo(record.id, record.prompt_len, block_size, hashes, True)
