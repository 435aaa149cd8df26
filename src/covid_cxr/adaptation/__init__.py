"""Adapting a model to one hospital from a few of its labelled radiographs (`covid-cxr adapt`).

The base model's frozen features feed a refitted linear head (numpy only), judged against the
base head by cross-validation by patient on the site's own labels; the result is an ordinary
ONNX model with the site's threshold and the cross-validated figures in its ModelInfo.
"""
