import os

from hypothesis import HealthCheck, settings

settings.register_profile("ci", max_examples=200, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=100, deadline=None)
settings.load_profile(os.environ.get("GMEM_HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


def pytest_report_header(config):
    """Say in the run's header whether the differential tests compare with a real kernel or
    check the model only."""
    from gmem import kernel
    why = kernel.unavailable_reason()
    if why is None:
        return "gmem.kernel: /dev/kvm with guest_memfd: differential tests run on the model and this kernel"
    return f"gmem.kernel: unavailable ({why}): differential tests check the model only"


def pytest_terminal_summary(terminalreporter):
    """The size of the hostile suite's edge-value sweep (tests/test_hostile.py), when it ran."""
    import sys
    counts = getattr(sys.modules.get("test_hostile"), "SWEEP_COUNTS", None)
    if counts:
        terminalreporter.write_line(
            f"hostile sweep: {counts['cases']} (method, position, value) cases: {counts['values']} edge values "
            f"in {counts['positions']} argument positions of {counts['members']} public calls of the stubs "
            f"({counts['failures']} findings, judged against its KNOWN_GAPS)")
