"""List-mode events, the TOF projector, the image geometry, list-mode MLEM with its sensitivity
image, randoms and scatter corrections, normalisation, the point response and rod metrics."""
