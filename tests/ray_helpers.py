"""A local Ray cluster for the kit's Ray tests (test_grade_many.py, test_ray_launch.py): 2 CPUs, no dashboard."""

import pytest


def start_local_ray(attempts: int = 2):
    """ray.init(num_cpus=2), tried again once: Ray waits a fixed 30 s for its raylet, which a loaded 2-core machine
    can miss. Returns the ray module, or None when this process had Ray running already (the caller then leaves it)."""
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        return None
    for attempt in range(attempts):
        try:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
            return ray
        except Exception:
            ray.shutdown()
            if attempt == attempts - 1:
                raise
    return None
