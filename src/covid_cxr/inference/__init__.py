"""Predictor, ONNX/int8 export and batch prediction."""
