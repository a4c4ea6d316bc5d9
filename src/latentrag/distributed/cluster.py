"""Connecting to Ray: a running cluster (`--address auto|HOST:PORT`) or a local one started on demand."""

from __future__ import annotations

from latentrag.errors import LatentRagError


def ray_module():
    """Ray, or a clear error saying how to install it (it is the optional extra `latentrag[ray]`)."""
    try:
        import ray
    except ImportError as e:  # pragma: no cover - ray is installed by `make test`
        raise LatentRagError("--ray needs Ray: pip install 'latentrag[ray]' (or ray[data]==2.60.0)") from e
    return ray


def connect(address: str | None = None, num_cpus: int | None = None):
    """Join the cluster at `address` ("auto": the one `ray start` began on this node), or start a local one
    when `address` is None. A process already connected keeps its connection. Returns the `ray` module."""
    ray = ray_module()
    if ray.is_initialized():
        return ray
    try:
        ray.init(address=address, num_cpus=None if address else num_cpus, include_dashboard=False,
                 log_to_driver=False, configure_logging=False)
    except ConnectionError as e:
        raise LatentRagError(
            f"cannot reach a Ray cluster at {address!r} ({e}); start one with `ray start --head` on the head node "
            "and `ray start --address HEAD:6379` on each worker, or leave --address out for a local cluster"
        ) from e
    return ray
