"""Data both training apps and the analysis tools share: images, their held-out regions, seeds."""
