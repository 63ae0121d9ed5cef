"""The synthetic upgrade generator and exactness verification (tests, demo, benchmarks)."""
