"""vaetool: variational autoencoders on folders of images."""

__version__ = "0.1.0"


def load(path, *, device: str = "auto", batch_size: int = 64):
    """Load a trained checkpoint (file or run folder) for inference: see `vaetool.api.VAEModel`."""
    from .api import load as _load  # imported here so `import vaetool` stays light

    return _load(path, device=device, batch_size=batch_size)


def save_images(images, target, *, prefix: str = "image_", ext: str = "png", force: bool = False):
    """Write float images in [0, 1] atomically into a folder or to paths: see `vaetool.api.save_images`."""
    from .api import save_images as _save

    return _save(images, target, prefix=prefix, ext=ext, force=force)
