"""The trainer's end-of-epoch work: validation, checkpoints and resume state, metrics, grids and the report.

A mixin of `train._Trainer`: its methods read the trainer's model, data split, config and counters.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import torch

from .. import checkpoint as ckpt
from ..io.decode import to_float
from ..io.write import save_grid
from .corrupt import step_generator
from .distributed import all_reduce_sum, barrier
from ..models.base import VAEFamily

GRID_SAMPLES = 64
GRID_RECONSTRUCTIONS = 16


class EpochEnd:
    def _end_epoch(self, *, partial: bool) -> dict[str, Any]:
        p = self.progress
        if float(self._sums[3]) > 0:
            self._report_steps(self._budget_steps())
        sums = all_reduce_sum(self._epoch_sums.clone(), self.world).tolist()
        count = max(sums[3], 1.0)
        metrics: dict[str, Any] = {
            "epoch": p.epoch if not partial else p.epoch + 1, "step": p.step, "partial": partial,
            "train_loss": sums[0] / count, "train_recon": sums[1] / count, "train_kl": sums[2] / count,
            "train_neg_elbo": (sums[1] + sums[2]) / count, "elapsed": round(self._elapsed(), 3),
            "beta": self._beta(), "decoder_log_scale": float(self._eval_model().log_scale.detach())}
        metrics.update(self._validate())
        score = metrics.get("val_neg_elbo", metrics["train_neg_elbo"])
        improved = score < p.best
        if improved:
            p.best, p.bad_epochs = score, 0
        elif not partial:
            p.bad_epochs += 1
        metrics["best"] = improved
        if self.world.is_main:
            self._save(metrics, improved)
            self._draw_grids(metrics["epoch"])
        barrier(self.world)
        self.callback("epoch", metrics)
        return metrics

    def _eval_model(self) -> VAEFamily:
        return self.ema if self.ema is not None else self.model

    @torch.no_grad()
    def _validate(self) -> dict[str, float]:
        """Validation -ELBO (beta = 1, fixed noise) and PSNR of posterior-mean reconstructions, in float32."""
        if len(self.val_index) == 0:
            return {}
        model = self._eval_model().eval()
        shard = self.val_index[self.world.rank::self.world.size]
        sums = torch.zeros(5, device=self.device, dtype=torch.float64)  # -elbo, recon, kl, psnr, count
        for k, start in enumerate(range(0, len(shard), self.batch)):
            index = shard[start: start + self.batch]
            x = to_float(self.cache.images[index], self.device).contiguous(memory_format=torch.channels_last)
            generator = step_generator(self.config.seed, k, self.device, stream=1)
            # float32 even when training in bf16: the figures must agree with `vaetool eval`.
            posterior = model.encode(x)
            z = posterior.sample(generator)
            logits = model.decode(z)
            mean_logits = model.decode(posterior.mode())
            recon = -model.log_likelihood(x, logits)
            kl = posterior.kl()
            mse = (model.mean_image(mean_logits) - x).pow(2).flatten(1).mean(1).clamp_min(1e-10)
            psnr = -10.0 * torch.log10(mse)
            sums += torch.stack([(recon + kl).sum(), recon.sum(), kl.sum(), psnr.sum(),
                                 torch.tensor(float(len(index)), device=self.device)]).double()
        self.model.train()
        total = all_reduce_sum(sums, self.world).tolist()
        n = max(total[4], 1.0)
        return {"val_neg_elbo": total[0] / n, "val_recon": total[1] / n, "val_kl": total[2] / n,
                "val_psnr": total[3] / n}

    def _training_summary(self, metrics: dict[str, Any]) -> dict[str, Any]:
        return {"step": self.progress.step, "epoch": self.progress.epoch, "images": len(self.cache.paths),
                "train_images": len(self.train_index), "val_images": len(self.val_index),
                "world_size": self.world.size, "global_batch": self.global_batch, "metrics": metrics}

    def _save(self, metrics: dict[str, Any], improved: bool) -> None:
        summary = self._training_summary(metrics)
        model = self._eval_model()
        ckpt.save_model(self.run_dir / ckpt.LAST_FILE, model, train_config=self.config, training=summary)
        if improved or not (self.run_dir / ckpt.MODEL_FILE).exists():
            ckpt.save_model(self.run_dir / ckpt.MODEL_FILE, model, train_config=self.config, training=summary)
            self.callback("saved", {"path": str(self.run_dir / ckpt.MODEL_FILE), "reason": "best"})
        self._save_state()
        with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as handle:
            handle.write(json.dumps(metrics) + "\n")

    def _save_state(self) -> None:
        """Everything --resume needs: raw weights, EMA, optimizer, counters and configs."""
        if not self.world.is_main:
            return
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        if self.ema is not None:
            tensors.update({f"ema.{k}": v for k, v in self.ema.state_dict().items()})
        optimizer_tensors, groups = ckpt.optimizer_tensors(self.optimizer)
        tensors.update(optimizer_tensors)
        self.progress.elapsed = self._elapsed()
        info = {"progress": dataclasses.asdict(self.progress), "optimizer_groups": groups,
                "train_config": self.config.to_dict(), "model_config": self.model_config.to_dict()}
        ckpt.save_state(self.run_dir / ckpt.STATE_FILE, tensors, info)
        if not (self.run_dir / ckpt.LAST_FILE).exists() or self.progress.step_in_epoch:
            ckpt.save_model(self.run_dir / ckpt.LAST_FILE, self._eval_model(), train_config=self.config,
                            training=self._training_summary({}))

    @torch.no_grad()
    def _draw_grids(self, epoch: int) -> None:
        """Samples from fixed prior draws and reconstructions of fixed images, one PNG each per epoch."""
        model = self._eval_model().eval()
        generator = torch.Generator().manual_seed(self.config.seed + 12_345)
        z = torch.randn(GRID_SAMPLES, self.model_config.latent_dim, generator=generator).to(self.device)
        samples = model.mean_image(model.decode(z)).cpu()
        pool = self.val_index if len(self.val_index) else self.train_index
        x = to_float(self.cache.images[pool[:GRID_RECONSTRUCTIONS]], self.device)
        recon = model.reconstruct(x)
        pairs = torch.cat([x, recon]).cpu()
        self.model.train()
        folder = self.run_dir / "grids"
        save_grid(folder / f"epoch_{epoch:04d}_samples.png", samples, nrow=8, force=True)
        save_grid(folder / f"epoch_{epoch:04d}_reconstructions.png", pairs, nrow=len(x), force=True)
        save_grid(self.run_dir / "samples.png", samples, nrow=8, force=True)
        save_grid(self.run_dir / "reconstructions.png", pairs, nrow=len(x), force=True)

    def _write_report(self) -> None:
        """report.png and report.html; a failure here costs the pictures, never the trained run."""
        from .report import write_report

        try:
            png, html = write_report(self.run_dir)
            self.callback("saved", {"path": str(png), "reason": "report"})
        except Exception as exc:  # noqa: BLE001 - matplotlib or a full disk must not lose the run
            self.callback("warning", {"message": f"could not write the training report: {exc}"})
