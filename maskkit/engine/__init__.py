"""The training engine: the three MLO-MAE objectives, the levels' loop, fine-tuning and a whole run."""
