"""Images -> features: batched, jit-compiled, data-parallel, cached by content, resumable.

:func:`extract_features` runs a backbone over a source and returns :class:`Features` (one
``[n, d]`` array per requested layer, the item ids, labels and what was skipped). Host-side
decoding runs in a thread pool ahead of the device (Pillow releases the GIL), the device
computes one fixed-size batch at a time (the last one padded and masked, so no image is
dropped), and every chunk of results is written to the content-keyed cache
(:mod:`featsim.features.cache`) as soon as it is done.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import hashlib
import json
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from tqdm.auto import tqdm

import featsim
from featsim import parallel
from featsim.backbones.registry import Backbone
from featsim.data.decode import load_rgb
from featsim.data.items import Item, Source
from featsim.data.sources import open_source
from featsim.data.transforms import Transform
from featsim.features.cache import Chunk, FeatureCache, default_cache_dir

__all__ = ["POOLING", "Features", "SkippedItem", "extract_features", "feature_layers"]

# How a spatial map [n, h, w, c] becomes a vector: "avg" = global average over h, w (the
# backbones' own pre_logits pooling); "flatten" = all h*w*c values.
POOLING = ("avg", "flatten")
#: Images whose shorter side is below this share of the backbone's input size are reported
#: (upscaled more than 8x: a 1 x 1 image, a thumbnail; MedMNIST's 28 px at 224 is not).
SMALL_FRACTION = 1 / 8
_SHOW = 5  # how many file names a summary lists


@dataclasses.dataclass(frozen=True)
class SkippedItem:
    """An image left out with ``skip_bad=True``: its id, file and the reason."""

    id: str
    name: str
    reason: str


@dataclasses.dataclass(frozen=True, eq=False)
class Features:
    """Features of the images of one source.

    Attributes:
        layers: layer name -> float32 ``[n, d]`` (spatial maps pooled per ``pooling``).
        ids: the ``n`` item ids, in the source's order, skipped items left out.
        labels: int64 ``[n]`` (-1 where unlabelled) or None.
        class_names: label index -> name.
        content_hashes: SHA-256 of each image's bytes.
        skipped: the items left out (only ever non-empty with ``skip_bad=True``).
        manifest: provenance: backbone, weights, layers, preprocessing, source, counts,
            featsim version, cache key.
    """

    layers: dict[str, np.ndarray]
    ids: tuple[str, ...]
    labels: np.ndarray | None
    class_names: tuple[str, ...]
    content_hashes: tuple[str, ...]
    skipped: tuple[SkippedItem, ...]
    manifest: dict

    def __getitem__(self, layer: str) -> np.ndarray:
        try:
            return self.layers[layer]
        except KeyError:
            raise KeyError(f"no layer {layer!r}; extracted: {sorted(self.layers)}") from None

    def __len__(self) -> int:
        return len(self.ids)

    def save(self, path: str | os.PathLike) -> Path:
        """Writes an ``.npz``: one array per layer, ids, labels, hashes and the manifest."""
        path = Path(path)
        if path.suffix.lower() != ".npz":
            raise ValueError(f"features are saved as .npz, got {path.name!r}")
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = dict(self.layers)
        arrays.update(
            ids=np.array(self.ids, np.str_),
            content_hashes=np.array(self.content_hashes, np.str_),
            manifest=np.array(json.dumps(self.manifest, sort_keys=True)),
        )
        if self.labels is not None:
            arrays["labels"] = self.labels
        np.savez(path, **arrays)
        return path


def feature_layers(backbone: Backbone) -> list[str]:
    """Layer names ``backbone`` can return (its features dict, plus ``logits`` with a head)."""
    return list(_feature_layers(backbone.module, backbone.input_shape))


@functools.lru_cache(maxsize=64)  # tracing a large model takes seconds; modules are hashable
def _feature_layers(module, input_shape) -> tuple[str, ...]:
    logits, feats = jax.eval_shape(
        lambda x: module.apply(module.init(jax.random.key(0), x, train=False), x, train=False),
        jax.ShapeDtypeStruct(input_shape, jnp.float32),
    )
    return (*feats, *(["logits"] if logits is not None else []))


def _variables_sha256(variables) -> str:
    digest = hashlib.sha256()
    for path, leaf in sorted(
        jax.tree_util.tree_flatten_with_path(variables)[0], key=lambda kv: str(kv[0])
    ):
        a = np.ascontiguousarray(np.asarray(leaf))
        digest.update(f"{jax.tree_util.keystr(path)}{a.dtype.str}{a.shape}".encode())
        digest.update(a.tobytes())
    return digest.hexdigest()


@functools.lru_cache(maxsize=16)
def _compiled_forward(module, layers: tuple[str, ...], pooling: str):
    """One compiled forward pass per (module, layers, pooling), shared by calls: extracting
    the target after the source, or a second run in one process, does not recompile.
    Flax modules hash by their fields, so equal configurations share the entry."""
    return parallel.data_parallel(_forward(module, layers, pooling))


def _forward(module, layers: tuple[str, ...], pooling: str):
    def apply(variables, x):
        logits, feats = module.apply(variables, x, train=False)
        if "logits" in layers:
            feats = dict(feats, logits=logits)
        out = {}
        for name in layers:
            f = feats[name].astype(jnp.float32)
            if f.ndim == 4:
                f = f.mean(axis=(1, 2)) if pooling == "avg" else f.reshape(f.shape[0], -1)
            out[name] = f
        return out

    return apply


def _hash_item(item: Item) -> tuple[str, str | None]:
    try:
        return item.content_hash(), None
    except OSError as err:
        return f"unreadable:{item.id}", f"cannot read {item.name}: {err}"


def extract_features(
    backbone: Backbone,
    source: Source | str | os.PathLike,
    *,
    layers: Sequence[str] = ("pre_logits",),
    transform: Transform | None = None,
    normalization: str = "backbone",
    pooling: str = "avg",
    batch_size: int = 32,
    chunk_batches: int = 8,
    cache: bool = True,
    cache_dir: str | os.PathLike | None = None,
    skip_bad: bool = False,
    num_workers: int | None = None,
    progress: bool = True,
    data_dir: str | os.PathLike | None = None,
    share: parallel.ProcessShare | None = None,
) -> Features:
    """Runs ``backbone`` over every image of ``source``.

    Args:
        backbone: a :class:`~featsim.backbones.Backbone` with ``variables`` (pretrained,
            fine-tuned, or explicitly ``dataclasses.replace(bb, variables=bb.init(key))``).
        source: a :class:`~featsim.data.Source` or a spec for
            :func:`~featsim.data.open_source` (folder, ``folder:split``, ``.npz``,
            ``tfds:NAME``, ``embedded:natural``).
        layers: feature names (see :func:`feature_layers`), all computed in one pass.
        transform: the preprocessing policy; default the backbone's own
            (``Transform.for_backbone(backbone.preprocessing, normalization)``).
        normalization: ``"backbone"`` or ``"paper"`` (Gu & Lee: mean 0.5, std 0.5); only
            used when ``transform`` is None.
        pooling: one of :data:`POOLING`, for layers that are spatial maps.
        batch_size: images per device step (rounded up to a multiple of the device count).
        chunk_batches: batches per cache chunk (the unit of resumption).
        cache: read and write the feature cache.
        cache_dir: cache root; default :func:`~featsim.features.cache.default_cache_dir`.
        skip_bad: leave out files that cannot be read or decoded and list them in
            ``Features.skipped``; default False raises an error naming the file.
        num_workers: decoding threads (default: CPU count, at most 8).
        progress: show a tqdm progress bar.
        data_dir: tensorflow-datasets folder for ``tfds:`` specs.
        share: the processes' split of the work (default
            :func:`featsim.parallel.process_share`: all of it in a one-process program). In a
            ``jax.distributed`` run every process makes the same call; each reads, decodes,
            computes and caches only its chunks (chunk ``c`` on process ``c % count``, so no
            two processes write one cache file), and every process returns the whole
            :class:`Features`, identical to a one-process run's (same chunks, same batches).
            Pass :data:`featsim.parallel.LOCAL` to extract everything in this process alone.

    Returns:
        :class:`Features`.

    Raises:
        ValueError: no variables, unknown layers or pooling, an empty source, or (without
            ``skip_bad``) an unreadable image, named in the message; also when every image
            was skipped.
    """
    if backbone.variables is None:
        raise ValueError(
            f"backbone {backbone.name!r} has no variables: load weights with "
            "get_backbone(name, pretrained=True) or pass random ones explicitly"
        )
    if pooling not in POOLING:
        raise ValueError(f"pooling must be one of {POOLING}, got {pooling!r}")
    available = feature_layers(backbone)
    layers = tuple(dict.fromkeys(layers))
    unknown = [name for name in layers if name not in available]
    if not layers or unknown:
        raise ValueError(f"unknown layers {unknown or '(none given)'} for {backbone.name}; "
                         f"available: {available}")
    if not isinstance(source, Source):
        source = open_source(source, data_dir=data_dir)
    if not source.items:
        raise ValueError(f"source {source.spec!r} has no images")
    if transform is None:
        transform = Transform.for_backbone(backbone.preprocessing, normalization=normalization)
    ndev = parallel.device_count()
    batch_size = -(-batch_size // ndev) * ndev
    chunk_size = batch_size * max(1, chunk_batches)
    num_workers = num_workers or min(8, os.cpu_count() or 1)

    weights_sha256 = _variables_sha256(backbone.variables)
    key_fields = {
        "backbone": backbone.name,
        "weights_sha256": weights_sha256,
        "layers": sorted(layers),
        "pooling": pooling,
        "preprocessing": transform.to_dict(),
        "batch_size": batch_size,
        "devices": f"{jax.default_backend()}x{ndev}",
        "jax": jax.__version__,
    }
    store = FeatureCache(cache_dir or default_cache_dir(), key_fields) if cache else None

    items = source.items
    share = parallel.process_share() if share is None else share
    starts = range(0, len(items), chunk_size)
    own = list(share.tasks(len(starts)))

    def compute_own() -> dict[int, Chunk]:
        return _own_chunks(backbone, items, starts, own, chunk_size=chunk_size, store=store,
                           transform=transform, layers=layers, pooling=pooling,
                           batch_size=batch_size, skip_bad=skip_bad, num_workers=num_workers,
                           progress=progress and share.is_main,
                           desc=f"{backbone.name} {source.spec}" + (
                               f" (process 0 of {share.count})" if share.count > 1 else ""))

    done: dict[int, Chunk] = {}
    for part in share.run(compute_own):
        done.update(part)
    chunks = [done[c] for c in range(len(starts))]
    hashes = [h for c in chunks for h in c.hashes]

    ok = np.concatenate([c.ok for c in chunks])
    errors = [e for c in chunks for e in c.errors]
    if not skip_bad and not ok.all():
        first = int(np.flatnonzero(~ok)[0])
        raise ValueError(f"{errors[first]} (cached from an earlier --skip-bad run; use "
                         "skip_bad=True / --skip-bad to leave it out)")
    skipped = tuple(SkippedItem(items[i].id, items[i].name, errors[i])
                    for i in np.flatnonzero(~ok))
    if not ok.any():
        raise ValueError(f"all {len(items)} images of {source.spec!r} were skipped; first: "
                         f"{skipped[0].name}: {skipped[0].reason}")
    keep = np.flatnonzero(ok)
    sizes = np.concatenate([c.sizes for c in chunks])
    small = _small_images(items, sizes, ok, transform.input_size)
    labels = source.labels
    feats = {name: np.concatenate([c.layers[name] for c in chunks if c.ok.any()])
             for name in layers}
    manifest = {
        "featsim_version": featsim.__version__,
        "backbone": backbone.name,
        "weights": {
            "file": str(backbone.weights_file) if backbone.weights_file else None,
            "description": backbone.weights.description if backbone.weights else None,
            "variables_sha256": weights_sha256,
        },
        "layers": list(layers),
        "pooling": pooling,
        "preprocessing": transform.to_dict(),
        "source": {"spec": str(source.spec), "kind": source.kind,
                   "description": source.description, "n_items": len(items),
                   "ignored_files": len(source.ignored),
                   "ignored_examples": list(source.ignored[:_SHOW])},
        "small_images": small,
        "n": len(keep),
        "skipped": len(skipped),
        "content_sha256": hashlib.sha256("\n".join(hashes).encode()).hexdigest(),
        "batch_size": batch_size,
        "devices": key_fields["devices"],
        "cache_key": store.key if store else None,
    }
    return Features(
        layers=feats,
        ids=tuple(items[i].id for i in keep),
        labels=None if labels is None else labels[keep],
        class_names=tuple(source.class_names),
        content_hashes=tuple(hashes[i] for i in keep),
        skipped=skipped,
        manifest=manifest,
    )


def _own_chunks(backbone, items, starts, own, *, chunk_size, store, transform, layers,
                pooling, batch_size, skip_bad, num_workers, progress, desc) -> dict[int, Chunk]:
    """The chunks ``own`` (indices into ``starts``): from the cache, else computed and
    cached. Only their items are read and decoded."""
    spans = {c: range(starts[c], min(starts[c] + chunk_size, len(items))) for c in own}
    with concurrent.futures.ThreadPoolExecutor(num_workers) as pool:
        index = [i for c in own for i in spans[c]]
        hashed = dict(zip(index, pool.map(_hash_item, [items[i] for i in index]), strict=True))
        read_errors = {i: e for i, (_, e) in hashed.items() if e is not None}
        if read_errors and not skip_bad:
            raise ValueError(next(iter(read_errors.values())) + " (use skip_bad=True / "
                             "--skip-bad to leave unreadable files out and list them)")
        hashes = {c: [hashed[i][0] for i in spans[c]] for c in own}
        chunks = {c: store.load(hashes[c], layers) if store else None for c in own}
        todo = [i for c in own if chunks[c] is None for i in spans[c]]
        decoded = _prefetch(pool, items, todo, transform, read_errors, lookahead=2 * batch_size)
        variables = jax.device_put(
            backbone.variables, NamedSharding(parallel.local_mesh(), PartitionSpec()))
        forward = _compiled_forward(backbone.module, layers, pooling)
        bar = tqdm(total=len(index), desc=desc, unit="img", disable=not progress)
        for c in own:
            if chunks[c] is None:
                chunks[c] = _compute_chunk(
                    forward, variables, decoded, hashes[c], batch_size, layers, skip_bad)
                if store:
                    store.save(chunks[c])
            bar.update(len(spans[c]))
        bar.close()
    return chunks


def _small_images(items, sizes: np.ndarray, ok: np.ndarray, input_size: int) -> dict:
    """Images whose shorter side is below ``SMALL_FRACTION`` of the input size: counted,
    a few named, and warned about once (they are upscaled, e.g. a 1 x 1 image to 224 px)."""
    threshold = max(1, int(input_size * SMALL_FRACTION))
    small = np.flatnonzero(ok & (sizes.min(axis=1) < threshold))
    names = [f"{items[i].id} ({sizes[i, 0]}x{sizes[i, 1]})" for i in small[:_SHOW]]
    if len(small):
        warnings.warn(
            f"{len(small)} of {int(ok.sum())} images have a side below {threshold} px and are "
            f"upscaled to the {input_size} px input: " + ", ".join(names)
            + (" ..." if len(small) > _SHOW else ""), stacklevel=3)
    return {"count": len(small), "below_px": threshold, "examples": names}


def _load(item: Item, transform: Transform, read_error: str | None):
    """``((pixels, (h, w)), None)`` or ``(None, reason)``: never raises for a bad image."""
    if read_error is not None:
        return None, read_error
    try:
        rgb = load_rgb(item)
        return (transform(rgb), rgb.shape[:2]), None
    except (ValueError, OSError) as err:  # ImageDecodeError is a ValueError
        return None, f"{item.name}: {err}" if item.name not in str(err) else str(err)


def _prefetch(pool, items, todo, transform, read_errors, *, lookahead) -> Iterator:
    """Decoded ``(pixels, error)`` for the items ``todo``, in order, ``lookahead`` ahead."""
    queue = collections.deque()
    it = iter(todo)
    for i in it:
        queue.append(pool.submit(_load, items[i], transform, read_errors.get(i)))
        if len(queue) >= lookahead:
            break
    while queue:
        result = queue.popleft().result()
        nxt = next(it, None)
        if nxt is not None:
            queue.append(pool.submit(_load, items[nxt], transform, read_errors.get(nxt)))
        yield result


def _compute_chunk(forward, variables, decoded, hashes, batch_size, layers, skip_bad) -> Chunk:
    pixels, errors = [], []
    for _ in hashes:
        x, err = next(decoded)
        if err is not None and not skip_bad:
            raise ValueError(f"{err} (use skip_bad=True / --skip-bad to leave bad files out "
                             "and list them)")
        pixels.append(x)
        errors.append(err or "")
    sizes = np.array([(0, 0) if x is None else x[1] for x in pixels], np.int64).reshape(-1, 2)
    good = [x[0] for x in pixels if x is not None]
    outs, pending = [], None
    for b in range(0, len(good), batch_size):
        batch, n = parallel.pad_batch(np.stack(good[b : b + batch_size]), batch_size)
        out = forward(variables, batch)  # dispatched asynchronously
        if pending is not None:
            outs.append(jax.tree.map(lambda a, k=pending[1]: np.asarray(a)[:k], pending[0]))
        pending = (out, n)
    if pending is not None:
        outs.append(jax.tree.map(lambda a, k=pending[1]: np.asarray(a)[:k], pending[0]))
    feats = {
        name: (np.concatenate([o[name] for o in outs]) if outs
               else np.zeros((0, 0), np.float32))
        for name in layers
    }
    return Chunk(hashes=tuple(hashes), ok=np.array([x is not None for x in pixels]),
                 errors=tuple(errors), layers=feats, sizes=sizes)
