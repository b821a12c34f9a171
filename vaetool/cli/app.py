"""The `vaetool` command line: registers the commands behind one error wrapper; torch is imported only by the commands that run."""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable
from typing import Annotated, Any

import typer

from .. import __version__
from . import train as train_commands
from . import denoise
from . import eval as eval_cmd
from . import visual
from . import latent
from . import prior
from .common import handle_errors, warn
from .options import Debug, Exclude, Include

app = typer.Typer(
    name="vaetool", no_args_is_help=True, add_completion=True, pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Variational autoencoders on folders of images. Results go to stdout (one path per line, or JSON with "
         "--json); progress, warnings and errors to stderr. Exit codes: 0 done, 1 error, 2 bad usage, 3 some "
         "inputs failed.",
)


def _version(value: bool) -> None:
    if value:
        print(f"vaetool {__version__}")
        raise typer.Exit()


# Commands whose model runs while worker threads decode and write images. There OpenMP's threads must sleep
# between operations instead of spin-waiting (its default), or they take the cores those workers need.
# `train` and `eval` are arithmetic between short reads and keep the default (BENCHMARKS.md).
STREAMING_COMMANDS = frozenset({"encode", "decode", "sample", "interpolate", "reconstruct", "traverse", "denoise",
                                "latent-map", "correlate"})


@app.callback()
def main(
    ctx: typer.Context,
    debug: Debug = False,
    version: Annotated[bool, typer.Option("--version", metavar="", callback=_version, is_eager=True,
                                          help="Print the version.")] = False,
) -> None:
    """Variational autoencoders on folders of images."""
    if debug:
        os.environ["VAETOOL_DEBUG"] = "1"
    if ctx.invoked_subcommand in STREAMING_COMMANDS:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read when torch starts OpenMP: torch is not loaded yet


def wrap_command(func: Callable[..., Any]) -> Callable[..., Any]:
    """`func` run inside the one error mapping (`handle_errors`), with `--debug` accepted after the subcommand too.

    The wrapper's signature is the command's plus `debug`, so Typer parses `--debug` like any other option.
    """
    signature = inspect.signature(func, eval_str=True)
    images = next((name for name in IMAGE_INPUTS if name in signature.parameters), None)

    @functools.wraps(func)
    def command(*args: Any, debug: bool = False, include: list[str] | None = None, exclude: list[str] | None = None,
                **kwargs: Any) -> Any:
        if debug:
            os.environ["VAETOOL_DEBUG"] = "1"
        with handle_errors():
            if (include or exclude) and kwargs.get(images):
                kwargs[images] = _selected(kwargs[images], include or [], exclude or [])
            return func(*args, **kwargs)

    extra = [inspect.Parameter("debug", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=Debug)]
    if images is not None:  # every command that reads image files takes the same patterns
        extra += [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=kind)
                  for name, kind in (("include", Include), ("exclude", Exclude))]
    parameters = [*signature.parameters.values(), *extra]
    command.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in parameters}
    return command


IMAGE_INPUTS = ("inputs", "data")  # the parameter names of the image files/folders a command reads


def _selected(inputs: list[str], include: list[str], exclude: list[str]) -> list[Any]:
    import sys

    from ..events import Failed
    from ..inference.folder import select_inputs

    def report(event: Any) -> None:
        if isinstance(event, Failed):
            warn(f"{event.input}: {event.reason}")

    return select_inputs(inputs, include=include, exclude=exclude, stdin=sys.stdin, callback=report)


# (name, function, panel): the top-level help lists every command with its docstring's first line.
COMMANDS = [
    ("train", train_commands.train, "Train and inspect"),
    ("info", train_commands.info_command, "Train and inspect"),
    ("report", visual.report, "Train and inspect"),
    ("eval", eval_cmd.eval_command, "Train and inspect"),
    ("fit-prior", prior.fit_prior, "Train and inspect"),
    ("sample", latent.sample, "Generate"),
    ("reconstruct", latent.reconstruct, "Generate"),
    ("denoise", denoise.denoise, "Generate"),
    ("interpolate", latent.interpolate, "Generate"),
    ("encode", latent.encode, "Latent space"),
    ("decode", latent.decode, "Latent space"),
    ("traverse", latent.traverse, "Latent space"),
    ("latent-map", visual.latent_map, "Latent space"),
    ("correlate", visual.correlate, "Latent space"),
]
for _name, _function, _panel in COMMANDS:
    app.command(_name, rich_help_panel=_panel)(wrap_command(_function))


def run() -> None:
    """Console-script entry point."""
    app()
