"""Training: the loop (`trainer.run`), DeepSpeed engine set-up, LR schedule, metrics, the train and plot CLIs."""
