"""Folder-in/folder-out commands on a trained model: latent operations, denoising, evaluation, latent maps."""
