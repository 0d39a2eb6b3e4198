import os

from hypothesis import HealthCheck, settings

settings.register_profile("ci", max_examples=200, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=100, deadline=None)
settings.load_profile(os.environ.get("GMEM_HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


def pytest_terminal_summary(terminalreporter):
    """The size of the hostile suite's edge-value sweep (tests/test_hostile.py), when it ran."""
    import sys
    counts = getattr(sys.modules.get("test_hostile"), "SWEEP_COUNTS", None)
    if counts:
        terminalreporter.write_line(
            f"hostile sweep: {counts['cases']} (method, position, value) cases: {counts['values']} edge values "
            f"in {counts['positions']} argument positions of {counts['members']} public calls of the stubs "
            f"({counts['failures']} findings, judged against its KNOWN_GAPS)")
