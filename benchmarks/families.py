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
At the same budget a plain pytorch/examples-style loop (a conv VAE with a linear bottleneck,
MSE + KL, Adam) trains on the detail set for the side-by-side; its PSNR and SSIM are measured on the
same held-out images with vaetool's own metric functions, and
(with --sample-metric) its prior samples go through the same two-sample test. Writes OUT/results.json, OUT/results.md
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
# name: (image side, channels); digits are gray like MNIST, the others colour.
DATASETS: dict[str, tuple[int, int]] = {"faces": (64, 3), "digits": (32, 1), "detail": (64, 3)}
FAMILIES = ("vector", "spatial", "hierarchical")  # the table's row order; others follow, the plain loop last
TRAIN_SEED, HELD_OUT_SEED = 0, 1
GRID_IMAGES = 16


# ------------------------------------------------------------------------------------------ data


def _make(name: str, folder: Path, *, count: int, seed: int) -> None:
    size = DATASETS[name][0]
    if name == "faces":
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


# ------------------------------------------------------------------------------ the plain loop


def _load_images(folder: Path, channels: int):
    """Every PNG under `folder` as one uint8 tensor (N, C, H, W), sorted by path."""
    import numpy as np
    import torch
    from PIL import Image

    mode = "L" if channels == 1 else "RGB"
    arrays = [np.asarray(Image.open(p).convert(mode)) for p in sorted(folder.rglob("*.png"))]
    stacked = np.stack(arrays)  # (N, H, W) or (N, H, W, C)
    return torch.from_numpy(stacked.reshape(*stacked.shape[:3], channels)).permute(0, 3, 1, 2).contiguous()


def _baseline_model(channels: int, size: int, latent: int = 64):
    """pytorch/examples' VAE with conv layers: four stride-2 convs, a linear bottleneck, the mirror back up."""
    import torch
    from torch import nn

    class ConvVAE(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            widths, self.side = (32, 64, 128, 256), size // 16
            layers, c = [], channels
            for w in widths:
                layers += [nn.Conv2d(c, w, 4, 2, 1), nn.ReLU()]
                c = w
            self.encoder = nn.Sequential(*layers, nn.Flatten())
            flat = widths[-1] * self.side * self.side
            self.mu, self.logvar = nn.Linear(flat, latent), nn.Linear(flat, latent)
            self.expand = nn.Linear(latent, flat)
            layers = []
            for w_in, w_out in zip(widths[::-1], [*widths[-2::-1], channels]):
                layers += [nn.ConvTranspose2d(w_in, w_out, 4, 2, 1), nn.ReLU()]
            self.decoder = nn.Sequential(*layers[:-1], nn.Sigmoid())

        def encode(self, x):
            h = self.encoder(x)  # (B, 256 * side * side)
            return self.mu(h), self.logvar(h)

        def decode(self, z):
            return self.decoder(self.expand(z).view(z.shape[0], -1, self.side, self.side))  # (B, C, H, W)

    torch.manual_seed(0)
    return ConvVAE()


def _save_grid(path: Path, images, nrow: int) -> None:
    """(N, C, H, W) floats in [0, 1] as one PNG grid with 2-pixel gaps."""
    import numpy as np
    from PIL import Image

    n, c, h, w = images.shape
    rows = (n + nrow - 1) // nrow
    sheet = np.full((rows * (h + 2), nrow * (w + 2), c), 255, np.uint8)
    pixels = (images.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()  # (N, H, W, C)
    for i, image in enumerate(pixels):
        r, k = divmod(i, nrow)
        sheet[r * (h + 2):r * (h + 2) + h, k * (w + 2):k * (w + 2) + w] = image
    Image.fromarray(sheet.squeeze(-1) if c == 1 else sheet).save(path)


def baseline_run(folder: Path, run: Path, *, seconds: float, channels: int, batch_size: int = 64,
                 sample_metric: int = 0) -> dict:
    """Train the plain loop (MSE summed + KL, Adam 1e-3) for `seconds` of wall time; PSNR/SSIM on the held-out set,
    and with `sample_metric` N, the two-sample test of N prior samples against the held-out images, the same test
    (`vaetool.inference.sample_metric`, same seed and setup) that `vaetool eval --samples N` runs."""
    import torch
    import torch.nn.functional as F

    from vaetool.inference.evaluate import psnr, ssim  # the same definitions as `vaetool eval`

    train, test = _load_images(folder / "train", channels), _load_images(folder / "test", channels)
    model = _baseline_model(channels, train.shape[-1])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    steps, started = 0, time.monotonic()
    while time.monotonic() - started < seconds:
        for index in torch.randperm(len(train), generator=generator).split(batch_size):
            x = train[index].float() / 255.0  # (B, C, H, W)
            mu, logvar = model.encode(x)
            z = mu + torch.randn(mu.shape, generator=generator) * (0.5 * logvar).exp()
            kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
            loss = F.mse_loss(model.decode(z), x, reduction="sum") + kl
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            steps += 1
            if time.monotonic() - started >= seconds:
                break
    elapsed = time.monotonic() - started
    with torch.inference_mode():
        x = test.float() / 255.0
        recon = torch.cat([model.decode(model.encode(b)[0]) for b in x.split(100)])  # posterior means
        _save_grid(run / "heldout_reconstructions.png", torch.cat([x[:GRID_IMAGES], recon[:GRID_IMAGES]]), GRID_IMAGES)
        _save_grid(run / "prior_samples.png", model.decode(torch.randn(64, 64, generator=generator)), 8)
        metrics = {"psnr": psnr(recon, x).mean().item(), "ssim": ssim(recon, x).mean().item()}
        two_sample = None
        if sample_metric:
            from vaetool.inference.sample_metric import classifier_two_sample_test

            drawn = torch.cat([model.decode(z) for z in torch.randn(sample_metric, 64, generator=generator).split(100)])
            two_sample = {"samples": {"two_sample": classifier_two_sample_test(x, drawn, seed=0).to_dict()}}
    return {"family": "baseline", "label": "plain loop (pytorch/examples)", "steps": steps,
            "train_s": round(elapsed, 1), "images_per_s": steps * batch_size / elapsed, "test": metrics,
            "sample_metric": two_sample,
            "grids": {"samples": str(run / "prior_samples.png"),
                      "reconstructions": str(run / "heldout_reconstructions.png")}}


# ------------------------------------------------------------------------------------- the table


def _fmt(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _accuracy(samples: dict | None) -> float | None:
    """The classifier two-sample test's accuracy from `eval --samples`, whatever its key is called."""
    two_sample = ((samples or {}).get("samples") or {}).get("two_sample") or {}
    return two_sample.get("accuracy")


def table(results: list[dict]) -> str:
    """The Markdown table: one row per (data, family), the baseline loop beside them."""
    head = ("| data | family | min | steps | img/s | -ELBO | -log p(x), IWAE | bits/dim | PSNR dB | SSIM | C2ST acc |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for r in results:
        if "error" in r:
            rows.append(f"| {r['data']} | {r['family']} | {r['minutes']:g} | failed: {r['error']} |" + " |" * 7)
            continue
        t = r["test"]
        rows.append(f"| {r['data']} | {r.get('label', r['family'])} | {r['minutes']:g} | {r['steps']} "
                    f"| {r['images_per_s']:.0f} "
                    f"| {_fmt(t.get('neg_elbo'), '.1f')} | {_fmt(t.get('iwae_nll'), '.1f')} "
                    f"| {_fmt(t.get('bits_per_dim'), '.3f')} | **{t['psnr']:.2f}** | {t['ssim']:.3f} "
                    f"| {_fmt(_accuracy(r.get('sample_metric')), '.3f')} |")
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
                        help="data sets for the pytorch/examples-style loop, comma separated, or none (default detail)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "families")
    parser.add_argument("--only", nargs="*", default=None, help="shell patterns of DATA-FAMILY names to run")
    parser.add_argument("--report", action="store_true", help="only print the table of the results in OUT")
    parser.add_argument("--baseline-worker", nargs=3, default=None, help=argparse.SUPPRESS)  # DATA FOLDER RUN
    args = parser.parse_args(argv)
    unknown = sorted(set(args.data.split(",")) - set(DATASETS))
    if unknown:
        parser.error(f"--data: unknown {', '.join(unknown)}; choose from {', '.join(DATASETS)}")
    if args.minutes <= 0 or args.count < 10 or args.held_out < 1:
        parser.error("need --minutes > 0, --count >= 10 and --held-out >= 1")
    return args


def _plan(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(data, family) pairs in run order; family 'baseline' is the plain loop."""
    baseline = [] if args.baseline == "none" else args.baseline.split(",")
    pairs = [(d, f) for d in args.data.split(",") for f in args.models.split(",") if f]
    pairs += [(d, "baseline") for d in args.data.split(",") if d in baseline]
    return [(d, f) for d, f in pairs if not args.only or any(fnmatch.fnmatchcase(f"{d}-{f}", p) for p in args.only)]


def collect(out: Path) -> list[dict]:
    """Every run's result in OUT/runs, this invocation's and earlier ones', in data-set order."""
    found = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*/result.json"))]
    families = [*FAMILIES, *sorted({r["family"] for r in found} - set(FAMILIES) - {"baseline"}), "baseline"]
    return sorted(found, key=lambda r: (list(DATASETS).index(r["data"]), families.index(r["family"])))


def main(argv: list[str] | None = None) -> None:
    """Run the plan one run at a time, then print and write the table."""
    args = _parse(argv)
    if args.baseline_worker:
        data, folder, run = args.baseline_worker
        result = baseline_run(Path(folder), Path(run), seconds=args.minutes * 60, channels=DATASETS[data][1],
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
            if family == "baseline":
                result = _baseline_subprocess(args.minutes, data, folder, run, sample_metric=args.sample_metric)
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


def _baseline_subprocess(minutes: float, data: str, folder: Path, run: Path, *, sample_metric: int) -> dict:
    """The plain loop in a fresh process of its own, as each vaetool command is; its result."""
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    command = [sys.executable, __file__, "--minutes", str(minutes), "--sample-metric", str(sample_metric),
               "--baseline-worker", data, str(folder), str(run)]
    with open(run / "commands.log", "w", encoding="utf-8") as log:
        done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the plain loop exited {done.returncode} (see {run / 'commands.log'})")
    return json.loads((run / "result.json").read_text())


if __name__ == "__main__":
    main(sys.argv[1:])
