"""Where a run computes and in which precision: bf16 and fp16 autocast in training, fp32 weights,
evaluation and packing in fp32, exact resume with the fp16 loss scaler, and the GPU path."""

import signal

import pytest
import torch

from onebit import engine, io
from onebit.train import Interrupted, TrainConfig, Trainer
from onebit.train.precision import resolve_device

SMALL = {"width": 8}


def run(out, **overrides) -> TrainConfig:
    values = dict(
        model="lenet_binary", data="digits", epochs=2, batch_size=64, seed=2, out=str(out), model_kwargs=SMALL
    )
    values.update(overrides)
    return TrainConfig(**values)


class Dtypes(Trainer):
    """Records the dtype of every conv output, in training steps and in evaluation apart."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen = {"train": set(), "eval": set()}
        for m in self.model.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.register_forward_hook(lambda mod, i, o: self.seen["train" if mod.training else "eval"].add(o.dtype))


def test_bf16_trains_in_bf16_on_the_cpu_keeps_fp32_weights_and_evaluates_in_fp32(tmp_path):
    trainer = Dtypes(run(tmp_path, precision="bf16"))
    history = trainer.fit()
    assert trainer.seen["train"] == {torch.bfloat16} and trainer.seen["eval"] == {torch.float32}
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    assert history[-1]["accuracy"] > 0.6 and history[-1]["train_loss"] < history[0]["train_loss"]
    assert trainer.scaler is None  # bf16 has fp32's range: no loss scaling


def test_a_model_trained_in_bf16_packs_bit_identically(tmp_path):
    trainer = Trainer(run(tmp_path, precision="bf16", epochs=1))
    trainer.fit()
    model = trainer.model.eval()
    x, _ = trainer.data.test.batch(torch.arange(64))
    packed = engine.pack(model, x[:1])
    with torch.no_grad():
        assert torch.equal(packed(x), model(x))


class StopAt(Trainer):
    stop_at = 0

    def on_step_end(self):
        if self.global_step == self.stop_at:
            self.request_stop(signal.SIGTERM)


def test_fp16_scales_the_loss_and_a_stopped_run_resumes_to_identical_weights(tmp_path):
    whole = Trainer(run(tmp_path / "whole", precision="fp16"))
    assert whole.scaler is not None
    whole.fit()
    StopAt.stop_at = 30  # epoch 1, step 7
    first = StopAt(run(tmp_path / "split", precision="fp16"))
    with pytest.raises(Interrupted):
        first.fit()
    resumed = Trainer.from_run(str(tmp_path / "split"))
    assert resumed.scaler.get_scale() == first.scaler.get_scale()
    resumed.fit()
    a, b = whole.model.state_dict(), io.load_tensors(tmp_path / "split" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_device_and_precision_options_are_named(tmp_path):
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        TrainConfig(precision="fp8").validate()
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        TrainConfig(device="tpu").validate()
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device cuda: no CUDA device"):
            Trainer(run(tmp_path, device="cuda"))
        assert resolve_device("auto") == torch.device("cpu")


@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="no CUDA device on this machine: the GPU path (cuda, fp16 with loss scaling, channels_last, "
    "pinned loader batches) runs where a GPU is lent",
)
def test_the_gpu_path_trains_in_fp16_channels_last_and_packs_on_the_cpu(tmp_path):
    trainer = Trainer(run(tmp_path, device="cuda", precision="fp16", memory_format="channels_last", loader_workers=2))
    assert trainer.device.type == "cuda"
    history = trainer.fit()
    assert history[-1]["accuracy"] > 0.6
    model = trainer.model.cpu().eval().to(memory_format=torch.contiguous_format)
    x, _ = trainer.data.test.batch(torch.arange(32))
    with torch.no_grad():
        assert torch.equal(engine.pack(model, x[:1])(x), model(x))
