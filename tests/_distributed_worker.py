"""One process of the multi-process tests (tests/test_distributed.py).

``python _distributed_worker.py COUNT INDEX PORT WORKDIR``: joins a COUNT-process run (COUNT 1:
no jax.distributed at all), extracts the features of WORKDIR/x and WORKDIR/y with a small
random backbone (chunks of 2 images, so every process owns several), computes every statistic
with the work split over the processes, and writes WORKDIR/out{INDEX}.npz. Test hooks by
environment: FEATSIM_TEST_DIE="I:K" makes process I exit abruptly when it starts its K-th
chunk (from 1); FEATSIM_TEST_CACHE names the feature cache folder.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

count, index, port, work = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], Path(sys.argv[4])

from featsim import parallel  # noqa: E402 - after the arguments, before any JAX call

share = (parallel.initialize(f"127.0.0.1:{port}", count, index, heartbeat_timeout_s=10)
         if count > 1 else parallel.LOCAL)

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from featsim import metrics  # noqa: E402
from featsim.backbones import Backbone, Preprocessing  # noqa: E402
from featsim.features import extract as extract_module  # noqa: E402
from featsim.metrics import mmd  # noqa: E402
from featsim.metrics.options import StatOptions  # noqa: E402
from featsim.report import similarity_report  # noqa: E402


class Tiny(nn.Module):
    @nn.compact
    def __call__(self, x, *, train=False):
        stem = nn.relu(nn.Conv(8, (3, 3), strides=2)(x))
        return None, {"stem": stem, "pre_logits": nn.Dense(6)(stem.mean(axis=(1, 2)))}


computed = []
real_compute = extract_module._compute_chunk
die = os.environ.get("FEATSIM_TEST_DIE")


def counting_compute(*args, **kwargs):
    computed.append(len(computed) + 1)
    if die and die == f"{index}:{len(computed)}":
        os._exit(17)  # as a killed process: no cleanup, no goodbye to the others
    return real_compute(*args, **kwargs)


extract_module._compute_chunk = counting_compute

module = Tiny()
variables = module.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
prep = Preprocessing(input_size=16, resize_size=16, crop="none", scaling="[0,1]")
backbone = Backbone(name="tiny", module=module, preprocessing=prep, variables=variables)
cache = Path(os.environ.get("FEATSIM_TEST_CACHE", work / f"cache{count}"))
feats = [extract_module.extract_features(backbone, str(work / s), layers=("pre_logits", "stem"),
                                         batch_size=2, chunk_batches=1, cache_dir=cache,
                                         progress=False, share=share)
         for s in ("x", "y")]
x = np.asarray(feats[0]["pre_logits"])
y = np.asarray(feats[1]["pre_logits"])

mmd._GRAM_TILE = 4  # several KID kernel tiles to share out
out = {"computed_chunks": np.array(len(computed))}
for name, f in zip("xy", feats, strict=True):
    out[f"{name}_features"] = f["pre_logits"]
    out[f"{name}_stem"] = f["stem"]
    out[f"{name}_ids"] = np.array(f.ids)
    out[f"{name}_hashes"] = np.array(f.content_hashes)
summary = metrics.distance_summary(x, y, block_size=8, share=share)  # several tiles
out["summary"] = np.array(json.dumps(summary.to_dict()))
for strategy in ("gram", "subsets"):
    mmd._host_strategy = lambda *args, s=strategy: s
    out[f"kid_{strategy}"] = metrics.kid(x, y, subset_size=5, num_subsets=9, seed=1,
                                         share=share).mmd2
stats = StatOptions(n_bootstrap=70, kid_subset_size=5, kid_subsets=9, seed=3)
report = similarity_report(x, y, stats=stats, progress=False, share=share)
out["report"] = np.array(json.dumps(report.to_dict(), sort_keys=True))
out["fid_infinity"] = np.array(metrics.fid_infinity(x, y, seed=2, share=share).value)
# Streaming statistics: each process sees some rows (round robin), the merge sees them all;
# a different summation order than one pass over all rows: compared to rounding ("close_").
for name, a in (("x", x), ("y", y)):
    own = np.asarray(list(share.tasks(len(a))))
    stats = metrics.FeatureStats.from_features(a[own]).merge_across(share)
    out[f"close_{name}_mean"], out[f"close_{name}_cov"] = stats.mean(), stats.cov()
    out[f"{name}_count"] = np.array(stats.count)
np.savez(work / f"out{count}_{index}.npz", **out)
print(f"process {index} of {count}: done, {len(computed)} chunks computed")
