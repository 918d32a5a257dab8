"""Calibrated quantization: the layer stream's calibration client, its statistics, the resumable
calibration phase of `scoutq quantize` (coverage.json), and the layer walk's memory estimate."""
