"""The layer stream: token windows through a checkpoint one decoder layer at a time, with hooks
for the job that walks it (calibration quantizes, evaluation records). See walk.py."""
