"""Metrics with confidence intervals, operating points, figures and reports.

`covid-cxr evaluate --model M --data D` scores D (a manifest's test split, a labelled CSV or a
class folder), picks thresholds on validation data (Youden's J and a target sensitivity), and
writes metrics.json, report.md, report.html and PNG figures. With --store-thresholds the
chosen thresholds and operating point go into the model file; `covid-cxr predict`, the
Predictor and the web service all decide with `ModelInfo.threshold` of the model they load.
"""
