"""Model families at equal wall time on faces, digits and the detail-rich set, through the installed command.

    .venv/bin/python benchmarks/families.py --minutes 3 --models vector,spatial,hierarchical \\
        --family-args 'spatial=--latent-channels 8 --downsample 4'
    .venv/bin/python benchmarks/families.py --report          # the table of the results already in OUT

For each data set (examples/faces.py, examples/digits.py, examples/detail.py; training images drawn
with seed 0, held-out images with seed 1) and each family, strictly one after another:

    vaetool train DATA/train -o RUN --time T --model KIND [family args] [--train-args] --seed 0
    vaetool eval RUN DATA/test --json -k K           (-ELBO, IWAE NLL, bits/dim, PSNR, SSIM)
    vaetool sample RUN -n 64 --grid RUN/prior_samples.png
    vaetool reconstruct RUN (16 held-out images) --grid RUN/heldout_reconstructions.png
    vaetool eval RUN DATA/test --samples N --json    (with --sample-metric N, once eval has it)

`--model` is passed only when `vaetool train` has that option (before it, only `vector` runs). A family
named `KIND@VARIANT` (e.g. `--models hierarchical,hierarchical@f2 --family-args 'hierarchical@f2=--downsample
2'`) runs KIND with that variant's train options, in a row of its own.
At the same budget the peers of benchmarks/peers.py (`--peers`: the plain pytorch/examples-style loop, pythae's
VAE with its default or its CelebA networks) train on the data sets of `--baseline` for the side-by-side; their
PSNR and SSIM are measured on the same held-out images with vaetool's own metric functions, and (with
--sample-metric) their prior samples go through the same two-sample test. Writes OUT/results.json, OUT/results.md
(the Markdown table, also printed) and the grids in each OUT/runs/NAME/.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "benchmarks"))
# name: (image side, channels); digits are gray like MNIST, the others colour; faces32 is `make demo`'s data.
DATASETS: dict[str, tuple[int, int]] = {"faces": (64, 3), "faces32": (32, 3), "digits": (32, 1), "detail": (64, 3)}
FAMILIES = ("vector", "spatial", "hierarchical")  # the table's row order; others follow, the peers last
TRAIN_SEED, HELD_OUT_SEED = 0, 1
GRID_IMAGES = 16
PEER_NAMES = ("baseline", "pythae", "pythae-celeba")  # benchmarks/peers.py; 'baseline' is the plain loop


# ------------------------------------------------------------------------------------------ data


def _make(name: str, folder: Path, *, count: int, seed: int) -> None:
    size = DATASETS[name][0]
    if name.startswith("faces"):
        from faces import make_faces

        make_faces(folder, count=count, size=size, seed=seed)
    elif name == "digits":
        from digits import make_digits

        make_digits(folder, count=count, size=size, seed=seed)
    else:
        from detail import make_detail

        make_detail(folder, count=count, size=size, seed=seed)


def prepare(name: str, root: Path, *, count: int, held_out: int) -> Path:
    """root/NAME/{train,test}, drawn once: made again when the counts change (delete root to redraw after an edit)."""
    folder = root / name
    stamp = {"count": count, "held_out": held_out, "size": DATASETS[name][0]}
    made = folder / "made.json"
    if made.is_file() and json.loads(made.read_text()) == stamp:
        return folder
    shutil.rmtree(folder, ignore_errors=True)  # only ever a folder this script made
    _make(name, folder / "train", count=count, seed=TRAIN_SEED)
    _make(name, folder / "test", count=held_out, seed=HELD_OUT_SEED)
    made.write_text(json.dumps(stamp))
    return folder


# -------------------------------------------------------------------------------------- vaetool


def vaetool_command() -> list[str]:
    """The installed `vaetool` beside this Python, else `python -m vaetool`."""
    script = Path(sys.executable).with_name("vaetool")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "vaetool"]


def _help(command: str) -> str:
    done = subprocess.run([*vaetool_command(), command, "--help"], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "200"}, check=False)
    return done.stdout


def _run(args: list[str], log: Path, *, stdin: str | None = None) -> str:
    """Run one vaetool command, stderr appended to `log`; return stdout, or raise with the log's last line."""
    with open(log, "a", encoding="utf-8") as handle:
        handle.write("$ vaetool " + shlex.join(args) + "\n")
        handle.flush()
        done = subprocess.run([*vaetool_command(), *args], input=stdin, stdout=subprocess.PIPE, stderr=handle,
                              text=True, check=False)
    if done.returncode != 0:
        tail = log.read_text(encoding="utf-8").strip().splitlines()[-1:]
        raise RuntimeError(f"vaetool {args[0]} exited {done.returncode}: {tail[0] if tail else ''} (see {log})")
    return done.stdout


def _seconds(minutes: float) -> str:
    return f"{max(1, round(minutes * 60))}s"


def run_family(data: str, family: str, *, folder: Path, run: Path, minutes: float, extra: list[str],
               iw_samples: int, sample_metric: int, has_model_option: bool, has_sample_option: bool) -> dict:
    """Train one family on one data set for `minutes`, then measure it on the held-out images."""
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    log = run / "commands.log"
    size = DATASETS[data][0]
    model = ["--model", family.split("@")[0]] if has_model_option else []  # "hierarchical@f2": a variant
    started = time.monotonic()
    trained = json.loads(_run(["train", str(folder / "train"), "-o", str(run / "run"), "--time", _seconds(minutes),
                               *model, "--image-size", str(size), "--seed", "0", "--cache-dir", str(run / "cache"),
                               "--json", *extra], log))
    wall = time.monotonic() - started
    shutil.rmtree(run / "cache", ignore_errors=True)
    info = json.loads(_run(["info", str(run / "run" / "last.safetensors"), "--json"], log))
    elapsed = trained["metrics"].get("elapsed") or wall
    test = json.loads(_run(["eval", str(run / "run"), str(folder / "test"), "--json", "-k", str(iw_samples)], log))
    _run(["sample", str(run / "run"), "-n", "64", "-o", str(run / "samples"), "--grid", str(run / "prior_samples.png"),
          "--seed", "0", "--force", "-q"], log)
    first = "\n".join(str(p) for p in sorted((folder / "test").glob("*.png"))[:GRID_IMAGES])
    _run(["reconstruct", str(run / "run"), "-", "-o", str(run / "reconstructions"),
          "--grid", str(run / "heldout_reconstructions.png"), "--force", "-q"], log, stdin=first)
    samples = None
    if sample_metric and has_sample_option:
        samples = json.loads(_run(["eval", str(run / "run"), str(folder / "test"), "--samples", str(sample_metric),
                                   "--train-data", str(folder / "train"), "--json", "-k", "1"], log))
    return {"data": data, "family": family, "minutes": minutes, "extra_args": extra, "steps": trained["step"],
            "epochs": trained["epoch"], "train_s": round(elapsed, 1), "wall_s": round(wall, 1),
            "images_per_s": trained["step"] * info["training"]["global_batch"] / max(elapsed, 1e-9),
            "parameters": info.get("parameters"), "model": info.get("model"), "test": test, "sample_metric": samples,
            "grids": {"samples": str(run / "prior_samples.png"),
                      "reconstructions": str(run / "heldout_reconstructions.png")}}


# ------------------------------------------------------------------------------------- the table


def _fmt(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _accuracy(samples: dict | None, key: str = "two_sample") -> float | None:
    """The classifier two-sample test's accuracy from `eval --samples`: of the samples, or (key "reconstructions")
    of reconstructions of half the held-out images against the other half, where that version of eval has it."""
    two_sample = ((samples or {}).get("samples") or {}).get(key) or {}
    return two_sample.get("accuracy")


def table(results: list[dict]) -> str:
    """The Markdown table: one row per (data, family), the baseline loop beside them."""
    head = ("| data | family | min | steps | img/s | -ELBO | -log p(x), IWAE | bits/dim | PSNR dB | SSIM | C2ST acc "
            "| C2ST recon |\n|---|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for r in results:
        if "error" in r:
            rows.append(f"| {r['data']} | {r['family']} | {r['minutes']:g} | failed: {r['error']} |" + " |" * 8)
            continue
        t = r["test"]
        rows.append(f"| {r['data']} | {r.get('label', r['family'])} | {r['minutes']:g} | {r['steps']} "
                    f"| {r['images_per_s']:.0f} "
                    f"| {_fmt(t.get('neg_elbo'), '.1f')} | {_fmt(t.get('iwae_nll'), '.1f')} "
                    f"| {_fmt(t.get('bits_per_dim'), '.3f')} | **{t['psnr']:.2f}** | {t['ssim']:.3f} "
                    f"| {_fmt(_accuracy(r.get('sample_metric')), '.3f')} "
                    f"| {_fmt(_accuracy(r.get('sample_metric'), 'reconstructions'), '.3f')} |")
    return "\n".join([head, *rows])


# ---------------------------------------------------------------------------------------- driver


def _family_args(items: list[str]) -> dict[str, list[str]]:
    """['spatial=--latent-channels 8 --downsample 4'] -> {'spatial': ['--latent-channels', '8', ...]}."""
    found: dict[str, list[str]] = {}
    for item in items:
        name, sep, rest = item.partition("=")
        if not sep or not name.strip():
            raise SystemExit(f"error: --family-args {item!r}: write FAMILY=ARGS, e.g. 'spatial=--downsample 4'")
        found.setdefault(name.strip(), []).extend(shlex.split(rest))
    return found


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=3.0, help="training wall time per run (default 3; also 10)")
    parser.add_argument("--models", default="vector", help="families, comma separated (default vector)")
    parser.add_argument("--data", default=",".join(DATASETS), help=f"data sets (default {','.join(DATASETS)})")
    parser.add_argument("--family-args", action="append", default=[], metavar="FAMILY=ARGS",
                        help="extra train options for one family (repeatable)")
    parser.add_argument("--train-args", default="", help="extra train options for every run, e.g. '--batch-size 32'")
    parser.add_argument("--count", type=int, default=2000, help="training images per data set (default 2000)")
    parser.add_argument("--held-out", type=int, default=300, help="held-out images per data set (default 300)")
    parser.add_argument("--iw-samples", type=int, default=100, help="K of the IWAE bound (default 100)")
    parser.add_argument("--sample-metric", type=int, default=0, metavar="N",
                        help="also `vaetool eval --samples N` (the two-sample test), when eval has it")
    parser.add_argument("--baseline", default="detail",
                        help="data sets for the peers, comma separated, or none (default detail)")
    parser.add_argument("--peers", default="loop",
                        help="peers to train beside vaetool: loop, pythae, pythae-celeba (default loop)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "families")
    parser.add_argument("--only", nargs="*", default=None, help="shell patterns of DATA-FAMILY names to run")
    parser.add_argument("--report", action="store_true", help="only print the table of the results in OUT")
    parser.add_argument("--baseline-worker", nargs=4, default=None, help=argparse.SUPPRESS)  # PEER DATA FOLDER RUN
    args = parser.parse_args(argv)
    unknown = sorted(set(args.data.split(",")) - set(DATASETS))
    if unknown:
        parser.error(f"--data: unknown {', '.join(unknown)}; choose from {', '.join(DATASETS)}")
    args.peers = [{"loop": "baseline"}.get(p, p) for p in args.peers.split(",") if p]
    if set(args.peers) - set(PEER_NAMES):
        parser.error(f"--peers: choose from loop, pythae, pythae-celeba, not {args.peers}")
    if args.minutes <= 0 or args.count < 10 or args.held_out < 1:
        parser.error("need --minutes > 0, --count >= 10 and --held-out >= 1")
    return args


def _plan(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(data, family) pairs in run order; the peers' families are PEER_NAMES."""
    baseline = [] if args.baseline == "none" else args.baseline.split(",")
    pairs = [(d, f) for d in args.data.split(",") for f in args.models.split(",") if f]
    pairs += [(d, peer) for d in args.data.split(",") if d in baseline for peer in args.peers]
    return [(d, f) for d, f in pairs if not args.only or any(fnmatch.fnmatchcase(f"{d}-{f}", p) for p in args.only)]


def collect(out: Path) -> list[dict]:
    """Every run's result in OUT/runs, this invocation's and earlier ones', in data-set order."""
    found = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*/result.json"))]
    families = [*FAMILIES, *sorted({r["family"] for r in found} - set(FAMILIES) - set(PEER_NAMES)), *PEER_NAMES]
    return sorted(found, key=lambda r: (list(DATASETS).index(r["data"]), families.index(r["family"])))


def main(argv: list[str] | None = None) -> None:
    """Run the plan one run at a time, then print and write the table."""
    args = _parse(argv)
    if args.baseline_worker:
        from peers import PEERS

        peer, data, folder, run = args.baseline_worker
        result = PEERS[peer](Path(folder), Path(run), seconds=args.minutes * 60, channels=DATASETS[data][1],
                             sample_metric=args.sample_metric)
        (Path(run) / "result.json").write_text(json.dumps({"data": data, "minutes": args.minutes, **result}, indent=1))
        return
    if not args.report:
        _run_plan(args, invocation=shlex.join(["benchmarks/families.py", *(sys.argv[1:] if argv is None else argv)]))
    results = collect(args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    commands = sorted({r.get("invocation", "") for r in results} - {""})
    (args.out / "results.md").write_text("".join(f"    python {c}\n" for c in commands) + "\n" + table(results) + "\n")
    print(table(results))


def _run_plan(args: argparse.Namespace, *, invocation: str) -> None:
    extra = _family_args(args.family_args)
    common = shlex.split(args.train_args)
    has_model, has_samples = "--model" in _help("train").split(), "--samples" in _help("eval").split()
    if args.sample_metric and not has_samples:
        print("vaetool eval has no --samples yet: no sample metric this time", file=sys.stderr, flush=True)
    for data, family in _plan(args):
        folder = prepare(data, args.out / "data", count=args.count, held_out=args.held_out)
        run = args.out / "runs" / f"{data}-{family}"
        print(f"{data}-{family}: {args.minutes:g} min ...", file=sys.stderr, flush=True)
        try:
            if family in PEER_NAMES:
                result = _peer_subprocess(family, args.minutes, data, folder, run, sample_metric=args.sample_metric)
            elif family != "vector" and not has_model:
                raise RuntimeError("this vaetool's train has no --model option yet")
            else:
                result = run_family(data, family, folder=folder, run=run, minutes=args.minutes,
                                    extra=common + extra.get(family, []), iw_samples=args.iw_samples,
                                    sample_metric=args.sample_metric, has_model_option=has_model,
                                    has_sample_option=has_samples)
        except RuntimeError as exc:
            print(f"{data}-{family}: FAILED: {exc}", file=sys.stderr, flush=True)
            run.mkdir(parents=True, exist_ok=True)
            result = {"data": data, "family": family, "minutes": args.minutes, "error": str(exc)}
        (run / "result.json").write_text(json.dumps({**result, "invocation": invocation}, indent=1))


def _peer_subprocess(peer: str, minutes: float, data: str, folder: Path, run: Path, *, sample_metric: int) -> dict:
    """One peer in a fresh process of its own, as each vaetool command is; its result."""
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    command = [sys.executable, __file__, "--minutes", str(minutes), "--sample-metric", str(sample_metric),
               "--baseline-worker", peer, data, str(folder), str(run)]
    with open(run / "commands.log", "w", encoding="utf-8") as log:
        done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{peer} exited {done.returncode} (see {run / 'commands.log'})")
    return json.loads((run / "result.json").read_text())


if __name__ == "__main__":
    main(sys.argv[1:])
