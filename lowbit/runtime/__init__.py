"""Running quantized models: KV-cache quantization and the lean decode loop."""
