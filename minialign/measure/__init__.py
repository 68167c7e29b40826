"""Measuring: the cost bench, live memory, estimator studies (lab), the arena and its tasks, step replay."""
