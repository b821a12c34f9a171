"""The Typer commands, one module per group; `vaetool.cli` assembles them. Nothing here imports torch at load."""
