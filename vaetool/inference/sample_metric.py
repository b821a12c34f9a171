"""How well samples pass for data: a classifier two-sample test, and the distance from samples to the training images.

The two-sample test (Lopez-Paz & Oquab 2017, "Revisiting classifier two-sample tests") trains a small
convolutional classifier on half of the real images and half of the generated ones and reports its
accuracy on the other halves: 0.5 means the classifier cannot tell them apart, 1.0 that every sample
gives itself away. With a few hundred images one split and one classifier's initial weights decide much
of that score, so by default it is cross-fitted (a second classifier trains on the other halves, and every
image is scored once) and repeated over three splits, and the mean is reported with the repeats' range.
A low score can also come from copying the training set, so the nearest-neighbour distance from each
sample to the training images is reported beside the same distance for held-out real images (a model that
memorises puts its samples much nearer than real images of the distribution).

Samples go through the same decoder as reconstructions, so the same test of the reconstructions of half
the real images against the other half tells how far a better prior alone could take the samples: when
the classifier tells even the reconstructions apart, the decoder's blur sets the score, not the prior.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import Checkpoint
from ..errors import DataError
from ..events import Callback, Note, Started, ignore

MAX_SIZE = 64  # larger images are area-averaged to this side first: the test stays fast at any size
NEAR_QUANTILE = 0.05
# Splits the two-sample test averages, each cross-fitted: on 200 + 200 images one split's score moved by up to
# 0.33 with the seed alone (BENCHMARKS.md, "A steadier sample metric").
REPEATS = 3
SAMPLE_CHUNK = 64  # prior samples decoded per pass (fixed, so the batch size never changes the draws)
MIN_RECONSTRUCTION_TEST = 8  # real images needed to score reconstructions of half against the other half (2 a class)


@dataclass
class TwoSampleResult:
    """The classifier two-sample test's scores on the held-out halves, with the setup that produced them."""

    accuracy: float  # balanced accuracy (mean of the per-class accuracies), so chance is 0.5 at any counts
    log_loss: float  # nats, per-class mean binary cross-entropy, averaged over the two classes
    p_value: float  # one-sided, against chance: accuracy ~ N(1/2, (1/n_real + 1/n_generated) / 16) under H0
    real_accuracy: float
    generated_accuracy: float
    real_train: int  # each classifier's training and test halves
    generated_train: int
    real_test: int
    generated_test: int
    image_size: tuple[int, int]
    widths: tuple[int, ...]
    parameters: int
    steps: int
    batch_size: int
    lr: float
    seed: int
    repeats: int = 1  # splits averaged
    cross_fitted: bool = False  # each split scored both ways: every image tested once per repeat
    accuracies: tuple[float, ...] = ()  # each repeat's accuracy

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    @property
    def spread(self) -> tuple[float, float]:
        """The lowest and highest of the repeats' accuracies."""
        return (min(self.accuracies), max(self.accuracies)) if self.accuracies else (self.accuracy, self.accuracy)

    def summary(self) -> str:
        """One line: the score and the setup, for a report or a log."""
        low, high = self.spread
        over = (f" (mean of {self.repeats} splits{', each cross-fitted' if self.cross_fitted else ''}: "
                f"{low:.3f}-{high:.3f})" if self.repeats > 1 else " (cross-fitted)" if self.cross_fitted else "")
        return (f"classifier two-sample test: accuracy {self.accuracy:.3f}{over} (0.5 = indistinguishable), "
                f"log-loss {self.log_loss:.3f}, p {self.p_value:.2g}; conv {list(self.widths)} "
                f"({self.parameters} parameters), {self.steps} steps of {self.batch_size}, seed {self.seed}, "
                f"each classifier trained on {self.real_train} real + {self.generated_train} generated, "
                f"tested on {self.real_test} + {self.generated_test}")


class Classifier(nn.Module):
    """Real (logit > 0) or generated: stride-2 convs with GroupNorm and SiLU, global average pool, linear."""

    def __init__(self, channels: int, widths: tuple[int, ...]) -> None:
        super().__init__()
        layers, in_ch = [], channels
        for width in widths:
            layers += [nn.Conv2d(in_ch, width, 3, stride=2, padding=1), nn.GroupNorm(math.gcd(width, 8), width),
                       nn.SiLU()]
            in_ch = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(in_ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x * 2.0 - 1.0)  # (B, W, h, w)
        return self.head(h.mean((2, 3))).squeeze(1)  # (B,) logits


def _prepare(images: torch.Tensor, name: str) -> torch.Tensor:
    if images.ndim != 4 or images.shape[0] < 2:
        raise DataError(f"the {name} images must be a batch (N, C, H, W) with N >= 2, got {tuple(images.shape)}")
    x = images.detach().to("cpu", torch.float32)
    if max(x.shape[-2:]) > MAX_SIZE:
        scale = MAX_SIZE / max(x.shape[-2:])
        size = (max(1, round(x.shape[-2] * scale)), max(1, round(x.shape[-1] * scale)))
        x = F.interpolate(x, size=size, mode="area")
    return x.nan_to_num(0.0).clamp(0.0, 1.0)


def _halves(count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.randperm(count, generator=generator)
    return order[: count // 2], order[count // 2:]


def _train(model: Classifier, real: torch.Tensor, fake: torch.Tensor, *, steps: int, batch_size: int, lr: float,
           generator: torch.Generator) -> None:
    """AdamW on class-balanced batches: half real, half generated, drawn with replacement."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-2)
    half = max(1, batch_size // 2)
    labels = torch.cat([torch.ones(half), torch.zeros(half)])  # (B,)
    for step in range(steps):
        # Cosine decay to zero: the last steps refine instead of jumping around the optimum.
        for group in optimizer.param_groups:
            group["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * step / steps))
        pick_real = torch.randint(real.shape[0], (half,), generator=generator)
        pick_fake = torch.randint(fake.shape[0], (half,), generator=generator)
        x = torch.cat([real[pick_real], fake[pick_fake]])  # (B, C, H, W)
        flip = torch.rand(x.shape[0], generator=generator) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)  # mirror images are as real as the originals
        loss = F.binary_cross_entropy_with_logits(model(x), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


@torch.no_grad()
def _scores(model: Classifier, images: torch.Tensor, label: float, batch_size: int) -> tuple[float, float]:
    """Accuracy and mean binary cross-entropy (nats) of the classifier on images of one class."""
    logits = torch.cat([model(images[i:i + 4 * batch_size]) for i in range(0, images.shape[0], 4 * batch_size)])
    target = torch.full_like(logits, label)
    correct = ((logits > 0).float() == target).float().mean()
    return float(correct), float(F.binary_cross_entropy_with_logits(logits, target))


def classifier_two_sample_test(real: torch.Tensor, generated: torch.Tensor, *, seed: int = 0, steps: int = 300,
                               batch_size: int = 64, widths: tuple[int, ...] = (16, 32, 64),
                               lr: float = 3e-3, repeats: int = REPEATS, cross_fit: bool = True) -> TwoSampleResult:
    """Train a classifier on half the real and half the generated images (N, C, H, W) in [0, 1]; score the rest.

    `cross_fit`: a second classifier trains on the other halves and scores the first ones, so every image is
    tested once; `repeats` such splits are averaged (accuracy, per-class accuracies, log-loss), and each
    repeat's accuracy kept. The splits, the initial weights and every batch come from `seed`, so the same
    inputs and seed give the same result; repeat 0 without cross-fitting is the single split of `seed`. Runs
    on the CPU in float32: the classifier is small, and the same arithmetic everywhere keeps the score
    comparable between machines. It trains, so it runs with gradients on even when called under
    `torch.inference_mode()` or `no_grad`, on tensors made there.
    """
    if repeats < 1:
        raise DataError(f"the two-sample test needs at least one repeat, not {repeats}")
    with torch.inference_mode(False), torch.enable_grad():
        return _two_sample_test(real, generated, seed=seed, steps=steps, batch_size=batch_size, widths=widths, lr=lr,
                                repeats=repeats, cross_fit=cross_fit)


@dataclass
class _Scored:
    """One classifier's correct answers and summed losses on its test halves."""

    real_correct: float
    real_loss: float
    real_count: int
    fake_correct: float
    fake_loss: float
    fake_count: int


def _fit_and_score(real: torch.Tensor, generated: torch.Tensor, train: tuple[torch.Tensor, torch.Tensor],
                   test: tuple[torch.Tensor, torch.Tensor], *, seed: int, steps: int, batch_size: int,
                   widths: tuple[int, ...], lr: float, generator: torch.Generator) -> tuple[_Scored, int]:
    with torch.random.fork_rng(devices=[]):  # seeded initial weights without touching the caller's RNG
        torch.manual_seed(seed)
        model = Classifier(real.shape[1], tuple(widths))
    _train(model, real[train[0]], generated[train[1]], steps=steps, batch_size=batch_size, lr=lr,
           generator=generator)
    real_acc, real_loss = _scores(model, real[test[0]], 1.0, batch_size)
    fake_acc, fake_loss = _scores(model, generated[test[1]], 0.0, batch_size)
    scored = _Scored(real_acc * len(test[0]), real_loss * len(test[0]), len(test[0]),
                     fake_acc * len(test[1]), fake_loss * len(test[1]), len(test[1]))
    return scored, sum(p.numel() for p in model.parameters())


def _two_sample_test(real: torch.Tensor, generated: torch.Tensor, *, seed: int, steps: int, batch_size: int,
                     widths: tuple[int, ...], lr: float, repeats: int, cross_fit: bool) -> TwoSampleResult:
    real, generated = _prepare(real, "real"), _prepare(generated, "generated")
    if real.shape[1:] != generated.shape[1:]:
        raise DataError(f"real images {tuple(real.shape[1:])} and generated ones {tuple(generated.shape[1:])} "
                        f"differ in channels or size; give images of one size")
    options = dict(steps=steps, batch_size=batch_size, widths=widths, lr=lr)
    per_repeat: list[tuple[float, float, float, float]] = []  # accuracy, real, generated accuracy, log-loss
    tested = (0, 0)
    for repeat in range(repeats):
        # Repeat 0 draws from `seed` alone, so it is the single split earlier versions scored.
        generator = torch.Generator().manual_seed(seed if repeat == 0 else seed * 7919 + repeat)
        real_train, real_test = _halves(real.shape[0], generator)
        fake_train, fake_test = _halves(generated.shape[0], generator)
        folds = [((real_train, fake_train), (real_test, fake_test))]
        if cross_fit:
            folds.append(((real_test, fake_test), (real_train, fake_train)))
        scores = []
        for fold, (train, test) in enumerate(folds):
            init = seed if (repeat, fold) == (0, 0) else seed * 7919 + 2 * repeat + fold
            scored, parameters = _fit_and_score(real, generated, train, test, seed=init, generator=generator,
                                                **options)
            scores.append(scored)
        counts = (sum(s.real_count for s in scores), sum(s.fake_count for s in scores))
        real_acc = sum(s.real_correct for s in scores) / counts[0]
        fake_acc = sum(s.fake_correct for s in scores) / counts[1]
        log_loss = 0.5 * (sum(s.real_loss for s in scores) / counts[0] + sum(s.fake_loss for s in scores) / counts[1])
        per_repeat.append((0.5 * (real_acc + fake_acc), real_acc, fake_acc, log_loss))
        tested = counts
    accuracy, real_acc, fake_acc, log_loss = (sum(r[i] for r in per_repeat) / repeats for i in range(4))
    # Under H0 each repeat's accuracy has this spread over the images it tested; the mean of correlated
    # repeats has no less, so the p-value stays conservative.
    std = math.sqrt((1.0 / tested[0] + 1.0 / tested[1]) / 16.0)
    return TwoSampleResult(
        accuracy=accuracy, log_loss=log_loss,
        p_value=0.5 * math.erfc((accuracy - 0.5) / std / math.sqrt(2.0)),
        real_accuracy=real_acc, generated_accuracy=fake_acc,
        real_train=len(real_train), generated_train=len(fake_train), real_test=len(real_test),
        generated_test=len(fake_test), image_size=(int(real.shape[2]), int(real.shape[3])), widths=tuple(widths),
        parameters=parameters, steps=steps, batch_size=batch_size, lr=lr, seed=seed, repeats=repeats,
        cross_fitted=cross_fit, accuracies=tuple(r[0] for r in per_repeat))


@torch.no_grad()
def nearest_distances(queries: torch.Tensor, references: torch.Tensor, *,
                      chunk: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel RMSE from each query image (M, C, H, W) to its nearest reference (N, C, H, W), and its index.

    The search runs in float32 matrix products (|q|^2 + |r|^2 - 2 q.r); the chosen pair's distance is
    then recomputed exactly, so a copy of a reference is at distance 0, not at float32 round-off.
    """
    if queries.shape[1:] != references.shape[1:]:
        raise DataError(f"images of shape {tuple(queries.shape[1:])} cannot be compared with training images "
                        f"of shape {tuple(references.shape[1:])}; give images of one size")
    q = queries.detach().to("cpu", torch.float32).flatten(1)  # (M, P)
    r = references.detach().to("cpu", torch.float32).flatten(1)  # (N, P)
    r_norms = r.pow(2).sum(1)  # (N,)
    best = torch.empty(q.shape[0], dtype=torch.long)
    for start in range(0, q.shape[0], chunk):
        block = q[start:start + chunk]  # (m, P)
        squared = r_norms[None] - 2.0 * (block @ r.T)  # (m, N), |q|^2 left out: it does not move the argmin
        best[start:start + chunk] = squared.argmin(1)
    exact = (q.double() - r[best].double()).pow(2).mean(1).sqrt()  # (M,)
    return exact.float(), best


@dataclass
class Memorisation:
    """Nearest-training-image distances (per-pixel RMSE in [0, 1]) of the samples, and of held-out real images."""

    mean: float
    median: float
    min: float
    near_fraction: float | None  # samples nearer than the closest 5% of held-out real images are
    reference_mean: float | None
    reference_median: float | None
    reference_min: float | None
    samples: int
    training: int
    reference: int

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def memorisation(generated: torch.Tensor, training: torch.Tensor,
                 held_out: torch.Tensor | None = None) -> Memorisation:
    """How near samples sit to the training images, against the same for held-out real images (N, C, H, W)."""
    samples, _ = nearest_distances(generated, training)
    reference = nearest_distances(held_out, training)[0] if held_out is not None and len(held_out) else None
    near = None
    if reference is not None:
        threshold = torch.quantile(reference.double(), NEAR_QUANTILE)
        near = float((samples.double() < threshold).float().mean())
    stat = (lambda f: None) if reference is None else (lambda f: float(f(reference)))
    return Memorisation(
        mean=float(samples.mean()), median=float(samples.median()), min=float(samples.min()), near_fraction=near,
        reference_mean=stat(torch.mean), reference_median=stat(torch.median), reference_min=stat(torch.min),
        samples=len(samples), training=len(training), reference=0 if reference is None else len(reference))


# ------------------------------------------------------------------------------ `vaetool eval --samples N`


@dataclass
class SampleReport:
    """A checkpoint's prior samples against real images, and how near they sit to training images."""

    two_sample: TwoSampleResult
    memorisation: Memorisation
    samples: int
    prior: str  # what the samples were drawn from: "fitted" (the checkpoint's fitted prior) or "standard" (the family's own)
    temperature: float | dict[str, float]  # one for every level, or per level
    seed: int
    reference: str  # which images the nearest-image distances are to
    setup: str = ""
    notes: list[str] = field(default_factory=list)
    # the same test of the reconstructions of half the real images against the other half (None: too few images)
    reconstructions: TwoSampleResult | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["two_sample"], data["memorisation"] = self.two_sample.to_dict(), self.memorisation.to_dict()
        data["reconstructions"] = self.reconstructions.to_dict() if self.reconstructions else None
        return data


def draw_samples(checkpoint: Checkpoint, count: int, *, seed: int = 0, temperature: float | dict[str, float] = 1.0,
                 prior: str = "auto") -> torch.Tensor:
    """`count` images (N, C, H, W) in [0, 1] on the CPU, decoded from prior latents as `vaetool sample` draws
    them (`latent_space.sample_latents`: the fitted prior with "auto" when the checkpoint has one), so the
    metric scores what users get; seeded on a CPU generator, decoded SAMPLE_CHUNK at a time."""
    from .latent_ops import decode_images
    from .latent_space import sample_latents

    latents = sample_latents(checkpoint, count, temperature=temperature, seed=seed, prior=prior)
    return decode_images(checkpoint, latents, batch_size=SAMPLE_CHUNK).clamp(0.0, 1.0)


@torch.no_grad()
def reconstruct_images(checkpoint: Checkpoint, images: torch.Tensor, *, batch_size: int = SAMPLE_CHUNK) -> torch.Tensor:
    """The family's own reconstructions (`model.reconstruct`: posterior means, level by level in a hierarchy),
    (N, C, H, W) in [0, 1] on the CPU, of images in [0, 1]; float32 on CPUs, as the commands run there."""
    from ..runtime import autocast, resolve_precision
    from .load import model_device

    model, device = checkpoint.model, model_device(checkpoint)
    parts = []
    with autocast(device, resolve_precision("auto", device)):
        for start in range(0, images.shape[0], batch_size):
            x = images[start:start + batch_size].to(device).contiguous(memory_format=torch.channels_last)
            parts.append(model.reconstruct(x).float().cpu())
    return torch.cat(parts).clamp(0.0, 1.0)


def prior_used(checkpoint: Checkpoint, prior: str) -> str:
    """What `prior` ("auto", "fitted", "standard") draws from for this checkpoint."""
    return "fitted" if prior != "standard" and getattr(checkpoint, "prior", None) is not None else "standard"


def _training_images(checkpoint: Checkpoint, train_data: Sequence[str | Path], *, batch_size: int,
                     workers: int | None, callback: Callback) -> torch.Tensor:
    """The training images at the model's size, (N, C, H, W) floats in [0, 1] on the CPU."""
    from ..io.batches import iter_batches
    from ..io.find import find_images

    cfg = checkpoint.config
    found = find_images(train_data, callback=callback)
    callback(Started("read training images", len(found)))
    parts = [batch for _, batch, _ in iter_batches(found, image_size=cfg.image_size, channels=cfg.channels,
                                                   batch_size=batch_size, workers=workers, callback=callback)]
    images = torch.cat(parts) if parts else torch.empty(0)
    if images.shape[0] == 0:
        raise DataError("none of the --train-data images could be read; give the folder the model was trained on")
    return images.float() / 255.0


def sample_report(checkpoint: Checkpoint, real: torch.Tensor, count: int, *, seed: int = 0,
                  temperature: float | dict[str, float] = 1.0,
                  prior: str = "auto", train_data: Sequence[str | Path] | None = None, batch_size: int = 64, workers: int | None = None,
                  test_options: dict[str, Any] | None = None, callback: Callback = ignore) -> SampleReport:
    """Draw `count` prior samples and score them against `real` images (N, C, H, W; uint8 or [0, 1] floats).

    The classifier two-sample test uses half of each set to train, half to score. The nearest-image
    distances are to the `train_data` images (held-out reference: `real`) when given; else to the half
    of `real` the classifier trained on (reference: the other half), which shows copying of those images only.
    With at least 8 real images, the same test scores the reconstructions of one half of `real` against
    the other half (`reconstructions`): roughly the best score a better prior alone could give.
    `test_options` go to `classifier_two_sample_test` (steps, batch_size, widths, lr).
    """
    if count < 2 or real.shape[0] < 2:
        raise DataError(f"the sample metric needs at least 2 samples and 2 real images, not {count} and "
                        f"{real.shape[0]}; give --samples 2 or more and more images")
    callback(Started("sample", count))
    generated = draw_samples(checkpoint, count, seed=seed, temperature=temperature, prior=prior)
    real = real.float() / 255.0 if real.dtype == torch.uint8 else real.float()
    test = classifier_two_sample_test(real, generated, seed=seed, **(test_options or {}))
    notes = []
    fit, held = _halves(real.shape[0], torch.Generator().manual_seed(seed))
    reconstructed = None
    if real.shape[0] >= MIN_RECONSTRUCTION_TEST:
        reconstructions = reconstruct_images(checkpoint, real[held], batch_size=batch_size)
        reconstructed = classifier_two_sample_test(real[fit], reconstructions, seed=seed, **(test_options or {}))
    if train_data:
        training = _training_images(checkpoint, train_data, batch_size=batch_size, workers=workers, callback=callback)
        memo, reference = memorisation(generated, training, real), "the --train-data images"
    else:
        memo = memorisation(generated, real[fit], real[held])
        reference = "half of the evaluated images (give --train-data for the training images)"
        notes.append("nearest-image distances are to evaluated images, not the training set: "
                     "they show copying only of those")
    report = SampleReport(test, memo, count, prior=prior_used(checkpoint, prior), temperature=temperature, seed=seed,
                          reference=reference, setup=test.summary(), notes=notes, reconstructions=reconstructed)
    for note in notes:
        callback(Note(note))
    return report
