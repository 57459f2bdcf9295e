"""Time one optimizer step of each training config, for the table in pipelines/README.md.

    python pipelines/bench_train.py                       # all configs, CPU
    python pipelines/bench_train.py --configs ctrate_xl --device cuda --batch 8

A step here is what the trainer does per optimizer step: encode the batch with
the codec, the DDPM epsilon loss of the stage's model (under the config's
mixed precision on a GPU), backward, gradient clipping, AdamW. Batches are
random grids/frames of the config's shapes, so no data set is needed; data
loading is not timed. A VAE codec whose folder is absent is replaced by a
randomly initialised AutoencoderKL of the Stable Diffusion VAE's architecture
(same cost). The config's performance switches apply as in training (TF32,
fused AdamW, bf16 VAE on CUDA; torch.compile and gradient checkpointing when
set). Prints one row per config and stage; on CUDA also the DiT's achieved
TFLOP/s (model FLOPs: 6 x parameters x tokens + 12 x depth x tokens^2 x width
per sample, the VAE not counted) and the model FLOPs utilisation (MFU) against
the GPU's dense bf16 peak where it is known.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from ctgridit.core.codecs import VAECodec
from ctgridit.core.diffusion import diffusion_loss, make_train_scheduler
from ctgridit.training.config import load_config
from ctgridit.training.trainer import build_codec, build_model, model_inputs, speed_up

CONFIGS = Path(__file__).parent / "configs"
#: diffusers' AutoencoderKL config of the Stable Diffusion VAE (sd-vae-ft-ema/mse).
SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, sample_size=512, scaling_factor=0.18215,
              block_out_channels=[128, 256, 512, 512], layers_per_block=2,
              down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)


def codec_for(config):
    if config.codec.kind == "vae" and not Path(config.codec.path).exists():
        from diffusers import AutoencoderKL

        return VAECodec.from_vae(AutoencoderKL(**SD_VAE)), "SD-VAE architecture, random weights"
    return build_codec(config), config.codec.kind


def time_stage(config, stage: int, device: torch.device, batch: int | None, steps: int) -> dict:
    optim = config.stage_optim(stage)
    batch = batch or optim.batch_size
    codec, codec_name = codec_for(config)
    codec.to(device)
    model = build_model(config, stage, codec).to(device).train()
    optimizer = speed_up(config, stage, device, model, codec)
    if config.performance.compile:
        model = torch.compile(model)
    scheduler = make_train_scheduler()
    spec = config.grid_spec
    h, w = spec.grid_size(*config.frame_size) if stage == 1 else tuple(config.frame_size)
    x = torch.rand(batch, codec.image_channels, h, w, device=device) * 2 - 1
    fake = {"x": x}                                           # a batch as the trainer's data loader gives it
    if stage == 2:
        fake["cond"] = x.clone()
    conditioning = config.stage1.conditioning
    if stage == 1 and conditioning.masked:
        g = torch.Generator().manual_seed(0)
        fake["known"] = torch.tensor([conditioning.tasks.draw(g, spec.rows, spec.cols) for _ in range(batch)])
    if stage == 1 and conditioning.strides:
        fake["stride_label"] = torch.full((batch,), max(config.strides))
    use_amp = device.type == "cuda" and optim.mixed_precision in ("bf16", "fp16")
    amp_dtype = torch.bfloat16 if optim.mixed_precision == "bf16" else torch.float16

    def step() -> float:
        with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
            loss = diffusion_loss(model, scheduler, **model_inputs(fake, codec, spec, device))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), optim.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    step()                                                   # warm-up (allocations, kernels)
    if device.type == "cuda":
        torch.cuda.synchronize()
    began = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - began) / steps
    params = sum(p.numel() for p in model.parameters())
    dit = getattr(model, "_orig_mod", model).config
    tokens = (dit.sample_height // dit.patch_size) * (dit.sample_width // dit.patch_size)
    flops = batch * (6 * params * tokens + 12 * dit.depth * tokens ** 2 * dit.hidden_size)
    spec = config.stage(stage).model
    label = spec.preset + "".join(f" {k}={v}" for k, v in spec.overrides.items())
    peak = peak_flops(device)
    return {"config": config.name, "stage": stage, "model": label, "params_M": params / 1e6,
            "input": f"{codec.image_channels}x{h}x{w}", "codec": codec_name, "batch": batch,
            "precision": optim.mixed_precision if use_amp else "fp32", "s_per_step": seconds,
            "samples_per_s": batch / seconds, "tflops": flops / seconds / 1e12,
            "mfu": flops / seconds / peak if peak else None}


#: Dense bf16 tensor-core peaks (FLOP/s) by device name.
PEAKS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "L4": 121e12,
         "RTX 4090": 165e12, "V100": 125e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAKS.items() if key in name), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["ct_small", "video_small", "ctrate_xl"])
    parser.add_argument("--stages", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=None, help="per-step batch (default: the config's)")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print("| config | stage | model | params (M) | input | codec | batch | precision | s/step | samples/s | TFLOP/s | MFU |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in args.configs:
        config = load_config(CONFIGS / f"{name}.yaml")
        for stage in args.stages:
            r = time_stage(config, stage, device, args.batch, args.steps)
            print(f"| {r['config']} | {r['stage']} | {r['model']} | {r['params_M']:.1f} | {r['input']} | {r['codec']} | "
                  f"{r['batch']} | {r['precision']} | {r['s_per_step']:.3f} | {r['samples_per_s']:.1f} | "
                  f"{r['tflops']:.2f} | {'' if r['mfu'] is None else format(r['mfu'], '.0%')} |", flush=True)


if __name__ == "__main__":
    main()
