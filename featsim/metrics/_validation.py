"""Input checks shared by the public metric functions, and the host/traced split.

Every public metric validates at the edge and then calls a private kernel that assumes
checked input (the scikit-learn ``check_pairwise_arrays`` -> ``_euclidean_distances`` habit).

Two execution paths exist:

* **Host path** (concrete NumPy or JAX arrays, the usual case): values are checked (NaN/inf
  rows are counted and reported) and the final reductions run in float64.
* **Traced path** (inside a user's ``jax.jit``/``vmap``): only shapes can be checked, and
  arithmetic stays in the widest float JAX currently allows (float32 unless x64 is enabled).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "as_features",
    "check_same_dim",
    "check_same_rows",
    "float_dtype",
    "host_x64",
    "is_traced",
    "widest_float",
]


def is_traced(*arrays) -> bool:
    """True when any argument is a JAX tracer (we are inside jit/vmap/grad)."""
    return any(isinstance(a, jax.core.Tracer) for a in arrays)


@contextlib.contextmanager
def host_x64(enabled: bool = True) -> Iterator[None]:
    """Enables float64 in JAX for the duration of a host-path computation.

    Inside a trace we must not change the config (the caller's jit owns it), so this is a
    no-op when ``enabled`` is False.
    """
    if not enabled:
        yield
        return
    with jax.enable_x64(True):
        yield


def widest_float() -> np.dtype:
    """The widest float JAX allows right now: float64 under x64 (the host path enables it),
    else float32."""
    return np.dtype(jax.dtypes.canonicalize_dtype(jnp.float64))


def float_dtype(x) -> np.dtype:
    """The floating dtype a computation on ``x`` runs in (ints and bools promote to float)."""
    dt = np.dtype(x.dtype)
    if np.issubdtype(dt, np.floating):
        return dt
    return np.dtype(np.float64) if jax.config.jax_enable_x64 else np.dtype(np.float32)


def as_features(x, name: str = "x", *, min_rows: int = 2, ndim: int = 2):
    """Checks a feature matrix and returns it as an array (NumPy on host, JAX when traced).

    Args:
      x: array-like of shape ``[n, d]`` (``ndim=2``) or ``[d]`` (``ndim=1``).
      name: how error messages call the argument.
      min_rows: smallest accepted ``n``.
      ndim: expected number of dimensions.

    Returns:
      ``x`` as a NumPy array (host path, floats keep their dtype, ints become float64) or
      the tracer itself (traced path).

    Raises:
      ValueError: wrong ``ndim``, fewer than ``min_rows`` rows, zero-width features, or
        (host path only) rows containing NaN or inf, with their count.
    """
    if is_traced(x):
        arr = x
    else:
        if isinstance(x, jax.Array):
            arr = np.asarray(jax.device_get(x))
        else:
            arr = np.asarray(x)
        if arr.dtype == object:
            raise ValueError(f"{name} must be a numeric array, got dtype=object")
        if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)
                or arr.dtype == bool):
            raise ValueError(f"{name} must be a numeric array, got dtype={arr.dtype}")
        if not np.issubdtype(arr.dtype, np.floating):
            arr = arr.astype(np.float64)
    if arr.ndim != ndim:
        want = "[n, d]" if ndim == 2 else ("[d]" if ndim == 1 else f"{ndim}-D")
        raise ValueError(f"{name} must have shape {want}, got shape {tuple(arr.shape)}")
    if ndim == 2:
        if arr.shape[0] < min_rows:
            raise ValueError(
                f"{name} needs at least {min_rows} rows (samples), got shape {tuple(arr.shape)}"
            )
        if arr.shape[1] < 1:
            raise ValueError(f"{name} has no feature columns: shape {tuple(arr.shape)}")
    if not is_traced(arr):
        finite = np.isfinite(arr)
        if not finite.all():
            if ndim == 2:
                bad = int((~finite.all(axis=1)).sum())
                raise ValueError(
                    f"{name} has {bad} row(s) with NaN or inf values (of {arr.shape[0]} rows, "
                    f"shape {tuple(arr.shape)})"
                )
            bad = int((~finite).sum())
            raise ValueError(f"{name} has {bad} NaN or inf value(s) (shape {tuple(arr.shape)})")
    return arr


def check_same_dim(x, y, names: tuple[str, str] = ("x", "y")) -> None:
    """Raises ValueError unless ``x`` and ``y`` have the same feature dimension."""
    if x.shape[-1] != y.shape[-1]:
        a, b = names
        raise ValueError(
            f"{a}.shape[1] == {x.shape[-1]} while {b}.shape[1] == {y.shape[-1]}: "
            f"features must have the same dimension (shapes {tuple(x.shape)} and "
            f"{tuple(y.shape)})"
        )


def check_same_rows(x, y, names: tuple[str, str] = ("x", "y"), *, why: str = "") -> None:
    """Raises ValueError unless ``x`` and ``y`` have the same number of rows."""
    if x.shape[0] != y.shape[0]:
        a, b = names
        msg = (
            f"{a}.shape[0] == {x.shape[0]} while {b}.shape[0] == {y.shape[0]} "
            f"(shapes {tuple(x.shape)} and {tuple(y.shape)})"
        )
        raise ValueError(f"{msg}: {why}" if why else msg)


def to_jnp(x, dtype=None):
    """NumPy/JAX array -> JAX array (keeps float dtype unless ``dtype`` is given)."""
    return jnp.asarray(x, dtype=dtype)
