"""The shipped calibration sets (`*.yaml`), installed as the package data `scoutq.calibration`.

This file only makes the folder a package, so `importlib.resources.files("scoutq.calibration")`
finds it both in an editable install (this folder) and from a wheel (a copy inside scoutq).
"""
