"""The `vaetool` command line: assembles the commands; torch is imported only by the commands that run."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from .. import __version__
from . import train as train_commands
from . import denoise
from . import eval as eval_cmd
from . import visual
from . import latent

app = typer.Typer(
    name="vaetool", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Variational autoencoders on folders of images: train, encode, decode, sample, interpolate, denoise.",
)


def _version(value: bool) -> None:
    if value:
        print(f"vaetool {__version__}")
        raise typer.Exit()


# Commands whose model runs while worker threads decode and write images. There OpenMP's threads must
# sleep between operations instead of spin-waiting (its default), or they take the cores those workers need:
# `sample` of 3,000 images took 4.6-4.9 s instead of 4.8-6.8 s on an idle 2-core machine, and half the time
# when another job ran. `train` and `eval` are arithmetic between short reads and keep the default (eval was
# 2-10% slower with sleeping threads).
STREAMING_COMMANDS = frozenset({"encode", "decode", "sample", "interpolate", "reconstruct", "traverse", "denoise",
                                "latent-map", "correlate"})


@app.callback()
def main(
    ctx: typer.Context,
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks (also VAETOOL_DEBUG=1).")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")] = False,
) -> None:
    """Variational autoencoders on folders of images."""
    if debug:
        os.environ["VAETOOL_DEBUG"] = "1"
    if ctx.invoked_subcommand in STREAMING_COMMANDS:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read when torch starts OpenMP: torch is not loaded yet


app.command("train")(train_commands.train)
app.command("info")(train_commands.info_command)
app.command("encode")(latent.encode)
app.command("decode")(latent.decode)
app.command("sample")(latent.sample)
app.command("interpolate")(latent.interpolate)
app.command("reconstruct")(latent.reconstruct)
app.command("traverse")(latent.traverse)
app.command("denoise")(denoise.denoise)
app.command("eval")(eval_cmd.eval_command)
app.command("report")(visual.report)
app.command("latent-map")(visual.latent_map)
app.command("correlate")(visual.correlate)


def run() -> None:
    """Console-script entry point."""
    app()
