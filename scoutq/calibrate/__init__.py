"""Calibration data for calibrated quantization: set definitions and tokenised batches.

A calibration set (`calibration/*.yaml`) names where the text comes from (the Hugging Face
hub, a local file, or the offline builtin corpus) and the default sample count, sequence
length and seed; `calibration_batch` turns it into the exact tokens a quantizer sees.
"""
