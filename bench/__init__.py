"""phift's benchmarks: the training benchmark's case table (cases), its harness, the peers and phift's own builder
(peers, phift_case), the scripts beside them, and the results store that BENCHMARKS.md is rendered from (report)."""
