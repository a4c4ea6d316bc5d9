"""Unit tests on tiny models run on one thread: on a shared 2-core machine two threads on tiny tensors
cost more in synchronisation than they gain. Integration tests keep the cores the process owns."""

import pytest
from tiny_models import one_thread


@pytest.fixture(autouse=True)
def _threads_for_test_size(request):
    if request.node.get_closest_marker("integration"):
        from latentrag.threads import configure_threads

        configure_threads()
        yield
    else:
        with one_thread():
            yield


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole session (starting one costs seconds): two CPUs, as in CI; actors
    request fractions of a CPU so that ray.data's tasks still get one."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()
