"""Suite-wide hooks: the test run leaves no helper processes behind (issue 24: a resource tracker and two fork servers,
~700 MB, outlived pytest)."""

from __future__ import annotations


def pytest_sessionfinish(session, exitstatus) -> None:
    # The reliability harness's fork server (and its resource tracker) live until asked to stop; Python offers no
    # public call for it, so the session's end asks through the module-level singletons the stdlib keeps.
    import multiprocessing.forkserver as forkserver
    import multiprocessing.resource_tracker as resource_tracker

    for helper in (forkserver._forkserver, resource_tracker._resource_tracker):
        stop = getattr(helper, "_stop", None)
        if stop is not None:
            try:
                stop()
            except Exception:  # noqa: BLE001 - best effort at exit; never fail a finished run
                pass
