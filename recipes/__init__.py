"""The shipped recipes (`*.yaml`), installed as the package data `scoutq.recipes`.

This file only makes the folder a package, so `importlib.resources.files("scoutq.recipes")`
finds it both in an editable install (this folder) and from a wheel (a copy inside scoutq).
"""
