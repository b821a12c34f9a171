"""Files: finding, decoding and writing images, the decoded cache, latents files, atomic writes."""
