"""What a data set is, by content: per-class counts and one SHA-256 over its images."""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
from collections.abc import Sequence

__all__ = ["content_sha256", "source_digest"]


def content_sha256(hashes: Sequence[str]) -> str:
    """SHA-256 of the newline-joined per-image SHA-256 hex digests, in source order: the
    definition of ``Features.manifest["content_sha256"]``."""
    return hashlib.sha256("\n".join(hashes).encode()).hexdigest()


def source_digest(source) -> dict:
    """``{"spec", "n_items", "class_counts", "content_sha256"}`` of a source or spec (images
    hashed on a few threads)."""
    from featsim.data.items import Source
    from featsim.data.sources import open_source

    if not isinstance(source, Source):
        source = open_source(source)
    with concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        hashes = list(pool.map(lambda it: it.content_hash(), source.items))
    counts: dict[str, int] = {}
    for item in source.items:
        name = ("unlabelled" if item.label is None else
                source.class_names[item.label] if item.label < len(source.class_names)
                else str(item.label))
        counts[name] = counts.get(name, 0) + 1
    return {"spec": str(source.spec), "n_items": len(source), "class_counts": counts,
            "content_sha256": content_sha256(hashes)}
