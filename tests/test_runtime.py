"""Device plumbing: device and precision choice, the batch gatherer the training loop feeds from, autocast."""

from __future__ import annotations

import pytest
import torch

from vaetool.errors import ConfigError
from vaetool.config import ModelConfig
from vaetool.models.vector import VAE
from vaetool.runtime import BatchGatherer, cpu_has_native_bf16, resolve_device, resolve_precision


def test_gatherer_gives_the_indexed_rows_on_the_device():
    source = torch.arange(5 * 3 * 4 * 4, dtype=torch.int64).remainder(256).to(torch.uint8).view(5, 3, 4, 4)
    gather = BatchGatherer(torch.device("cpu"))
    for index in (torch.tensor([4, 0, 2]), torch.tensor([1]), torch.tensor([3, 3])):
        batch = gather(source, index)
        assert batch.dtype == torch.uint8 and torch.equal(batch, source[index])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gatherer_double_buffers_pinned_copies_on_cuda():
    source = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8)
    gather = BatchGatherer(torch.device("cuda"))
    batches = [(index, gather(source, index)) for index in torch.randperm(64).view(8, 8)]
    for index, batch in batches:  # each batch is still right after its buffer was reused
        assert torch.equal(batch.cpu(), source[index])


def test_device_and_precision_choices():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    assert resolve_precision("fp32", torch.device("cpu")) is None
    assert resolve_precision("auto", torch.device("cpu")) is None  # inference: float32 on any CPU
    native = torch.bfloat16 if cpu_has_native_bf16() else None  # training: bf16 where the CPU has it
    assert resolve_precision("auto", torch.device("cpu"), training=True) == native
    assert resolve_precision("fp32", torch.device("cpu"), training=True) is None
    assert resolve_precision("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU"):
        resolve_precision("fp16", torch.device("cpu"))
    with pytest.raises(ConfigError, match="unknown device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            resolve_device("cuda")


def test_bf16_autocast_keeps_the_layers_at_the_ends_in_float32():
    model = VAE(ModelConfig(image_size=16, widths=(8, 16), latent_dim=4, blocks=1))
    seen = {}
    layers = {"first conv": model.encoder.stages[0][0], "second conv": model.encoder.stages[1][0],
              "encoder head": model.encoder.head, "decoder head": model.decoder.head, "last conv": model.decoder.out}
    for name, layer in layers.items():
        layer.register_forward_hook(lambda module, args, out, name=name: seen.__setitem__(name, out.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.rand(2, 3, 16, 16))
    assert seen == {"first conv": torch.float32, "second conv": torch.bfloat16, "encoder head": torch.float32,
                    "decoder head": torch.float32, "last conv": torch.float32}
    assert out.logits.dtype == out.posterior.mu.dtype == torch.float32
    plain = model(torch.rand(2, 3, 16, 16))  # without autocast everything is float32, as before
    assert plain.logits.dtype == torch.float32


def test_group_norm_statistics_are_float32_under_bf16_autocast(monkeypatch):
    model = VAE(ModelConfig(image_size=16, widths=(8, 16), latent_dim=4, blocks=1))
    inputs, real = [], torch.nn.functional.group_norm

    def recording(x, *args, **kwargs):
        inputs.append(x.dtype)
        return real(x, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "group_norm", recording)
    norm_outputs = []
    for module in model.modules():
        if isinstance(module, torch.nn.GroupNorm):
            module.register_forward_hook(lambda m, args, out: norm_outputs.append((args[0].dtype, out.dtype)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.rand(2, 3, 16, 16))
    assert inputs and set(inputs) == {torch.float32}  # the statistics: never computed in bf16
    assert any(given == torch.bfloat16 for given, _ in norm_outputs)  # bf16 activations do reach the norms
    assert all(given == returned for given, returned in norm_outputs)  # and leave in the dtype they came in
