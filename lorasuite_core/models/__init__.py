"""Model families as data, checkpoint and adapter loading, model fetch and GGUF conversion."""
