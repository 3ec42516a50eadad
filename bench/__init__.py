"""Benchmarks of oqron-cache against its peers (issue 2). See bench/README.md."""
