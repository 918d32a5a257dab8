"""Text for calibration and evaluation: the offline builtin corpus, calibration-set definitions
(`calibration/*.yaml`, hub, local files) and tokenisation with a checkpoint's own tokenizer."""
