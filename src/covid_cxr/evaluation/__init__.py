"""Metrics with confidence intervals, operating points, figures and reports."""
