"""Hypothesis profiles for the fuzz tests: ``short`` (the default, part of the fast suite) and
``long`` (``make fuzz``, or HYPOTHESIS_PROFILE=long). No example database is written: the
tree stays clean, and a failure prints its reproducing example instead. The deadlines are
generous (the suite shares small CI machines); pytest-timeout bounds each test as a whole."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

_COMMON = {"database": None, "print_blob": True,
           "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large]}
settings.register_profile("short", max_examples=40, deadline=20000, **_COMMON)
settings.register_profile("long", max_examples=20000, deadline=60000, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "short"))
