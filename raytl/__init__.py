"""raytl: find the best way to transfer a pretrained image model to a new task, on Ray."""

__version__ = "0.1.0"
