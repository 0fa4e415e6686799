"""Running quantized models: the lean decode loop, its native decode step and text generation."""
