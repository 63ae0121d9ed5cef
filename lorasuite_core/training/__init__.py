"""LoRA training, light fine-tuning, evaluation and the task data."""
