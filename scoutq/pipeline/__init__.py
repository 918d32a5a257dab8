"""Jobs that walk a checkpoint: the quantization plan and its streaming execution, verification."""
