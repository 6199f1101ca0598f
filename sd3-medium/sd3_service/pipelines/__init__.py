"""The model: find and load the weights, place a pipeline on every device, and run generations there."""
