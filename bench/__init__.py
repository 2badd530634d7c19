"""Benchmarks: programs that start the real system and print figures. They are not tests and assert no
timings; ``tests/bench`` only checks that they run. See ``bench/README.md``."""
