"""What a training process needs besides the model and the data: checkpoints (`checkpoint/`)."""
