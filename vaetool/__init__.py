"""vaetool: variational autoencoders on folders of images."""

__version__ = "0.1.0"
