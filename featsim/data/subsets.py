"""Label-stratified subsets of a source, seeded and kept in source order."""

from __future__ import annotations

import dataclasses

import numpy as np

from featsim.data.items import Source

__all__ = ["balanced_subset", "proportional_subset"]


def _open(source) -> Source:
    if isinstance(source, Source):
        return source
    from featsim.data.sources import open_source

    return open_source(source)


def _by_label(source: Source) -> dict:
    out: dict = {}
    for i, item in enumerate(source.items):
        out.setdefault(item.label, []).append(i)
    return out


def _check_n(n) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"subset size must be an integer >= 1, got {n!r}")
    return int(n)


def balanced_subset(source, n: int, *, seed: int = 0) -> Source:
    """At most ``n`` items, as balanced over labels as the classes allow.

    Round robin over the classes (sorted by label) in a seeded order within each class; the
    chosen items are kept in source order and the spec says it is a subset
    (``"SPEC [quick subset: n of N, seed S]"``, which :func:`featsim.data.open_source`
    reopens). A source of at most ``n`` items comes back as is.

    Args:
      source: a :class:`~featsim.data.Source` or spec.
      n: the subset size, >= 1.
      seed: seed of the order within each class.
    """
    n = _check_n(n)
    source = _open(source)
    if len(source) <= n:
        return source
    rng = np.random.default_rng(seed)
    queues = [list(rng.permutation(v)) for _, v in sorted(_by_label(source).items(),
                                                            key=lambda kv: str(kv[0]))]
    chosen: list[int] = []
    while len(chosen) < n:
        for q in queues:
            if q and len(chosen) < n:
                chosen.append(int(q.pop()))
    items = tuple(source.items[i] for i in sorted(chosen))
    return dataclasses.replace(source, items=items,
                               spec=f"{source.spec} [quick subset: {n} of {len(source)}, "
                                    f"seed {seed}]")


def proportional_subset(source, n: int, *, seed: int = 0) -> Source:
    """At most ``n`` items in the source's own class proportions (largest remainders).

    Chosen with a seeded permutation per class and kept in source order; the spec says it is
    a subset (``"SPEC [stratified subset: n of N, seed S]"``, which
    :func:`featsim.data.open_source` reopens). Training on it keeps the class
    imbalance that a class-weighted loss is there for.

    Args:
      source: a :class:`~featsim.data.Source` or spec.
      n: the subset size, >= 1.
      seed: seed of the permutations.
    """
    n = _check_n(n)
    source = _open(source)
    if len(source) <= n:
        return source
    rng = np.random.default_rng(seed)
    by_label = _by_label(source)
    labels = sorted(by_label, key=str)
    exact = np.array([len(by_label[k]) for k in labels], float) * n / len(source)
    counts = np.floor(exact).astype(int)
    for j in np.argsort(-(exact - counts), kind="stable")[: n - int(counts.sum())]:
        counts[j] += 1
    chosen = [int(i) for k, c in zip(labels, counts, strict=True)
              for i in rng.permutation(by_label[k])[:c]]
    items = tuple(source.items[i] for i in sorted(chosen))
    return dataclasses.replace(source, items=items,
                               spec=f"{source.spec} [stratified subset: {n} of {len(source)}, "
                                    f"seed {seed}]")
