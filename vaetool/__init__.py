"""vaetool: variational autoencoders on folders of images."""

__version__ = "0.1.0"


def load(path, *, device: str = "auto", batch_size: int = 64):
    """Load a trained checkpoint (file or run folder) for inference: see `vaetool.api.VAEModel`."""
    from .api import load as _load  # imported here so `import vaetool` stays light

    return _load(path, device=device, batch_size=batch_size)
