"""Trade-off analysis: sweeps, per-layer sensitivity, mixed-precision allocation, statistics, plots, reports."""
