"""The train stage: Ray Train fine-tuning, from the driver (trainer) to each worker (loop)."""
