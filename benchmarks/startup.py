"""Start-up time of the installed command: `vaetool --help` against bare Python, and a torch command against
torch's own import, measured interleaved in the same run.

    python benchmarks/startup.py [--rounds 15]

Each round runs, in fresh processes and in this order: `python -c pass`, `vaetool --help`,
`vaetool train --help`, `python -c "import torch"`, and `vaetool info CKPT` (a command that needs torch: it
loads a small checkpoint and prints its summary). Medians over the rounds are printed, with what a torch
command adds on top of importing torch. `vaetool --help` must also import no torch: checked by asking
Python which modules it loaded.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VAETOOL = str(Path(sys.executable).with_name("vaetool"))


def wall(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def help_imports_torch() -> bool:
    probe = ("import sys; sys.argv = ['vaetool', '--help']\nfrom vaetool.cli.app import app\n"
             "try:\n    app()\nexcept SystemExit:\n    pass\nprint('torch' in sys.modules, file=sys.stderr)")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return result.stderr.strip().splitlines()[-1] == "True"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    import torch

    from vaetool.checkpoint import save_model
    from vaetool.config import ModelConfig
    from vaetool.models.vector import VAE

    work = Path(tempfile.mkdtemp(prefix="vaetool-startup-"))
    ckpt = save_model(work / "model.safetensors", VAE(ModelConfig()))
    commands = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "vaetool --help": [VAETOOL, "--help"],
        "vaetool train --help": [VAETOOL, "train", "--help"],
        "python -c 'import torch'": [sys.executable, "-c", "import torch"],
        "vaetool info CKPT": [VAETOOL, "info", str(ckpt)],
    }
    for cmd in commands.values():  # warm the page cache
        wall(cmd)
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(args.rounds):
        for name, cmd in commands.items():
            times[name].append(wall(cmd))
    med = {name: statistics.median(values) for name, values in times.items()}
    print(f"torch {torch.__version__}; {args.rounds} interleaved rounds; median wall seconds (min-max)")
    for name, values in times.items():
        print(f"  {name:28s} {med[name]:6.3f}  ({min(values):.3f}-{max(values):.3f})")
    print(f"vaetool --help imports torch: {help_imports_torch()}")
    print(f"vaetool --help above bare Python:     {med['vaetool --help'] - med['python -c pass']:+.3f} s")
    torch_cmd = "python -c 'import torch'"
    print(f"vaetool info above importing torch:   {med['vaetool info CKPT'] - med[torch_cmd]:+.3f} s "
          f"(Typer, Rich, loading and summarising the checkpoint)")


if __name__ == "__main__":
    main()
