"""The brain image, the Radon operator and the denoising and Radon reconstruction experiments."""
