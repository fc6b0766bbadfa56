//! Test harness for jobq (filled in by the integration suites).
