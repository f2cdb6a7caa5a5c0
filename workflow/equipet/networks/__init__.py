"""The SCNN and CNN and the training loop they share."""
