"""A prepared check for a GPU machine (one command, prints figures):

    python -m anyflow.gpu_check                # on a GPU: 1.3B-shaped step at 81×480×832, then tiny Wan runs
    python -m anyflow.gpu_check --smoke        # anywhere (CPU): the same code on a small shape, for CI

1. A Wan2.1-1.3B-shaped flow-map transformer with random weights (built on the meta device, sharded with FSDP2
   over this process's devices, bf16 compute with fp32 times, activation checkpointing), one clip of
   81×480×832 (21×60×104 latents, 32 760 tokens): forward + backward, median step time after a warm-up, peak
   memory and achieved TFLOP/s (the model's FLOPs: 2·params·tokens per forward plus attention, ×4 for the
   backward with recomputation).
2. One pretrain and one on-policy iteration of ``train.py`` on a tiny random Wan2.1 folder written with the real
   classes (LoRA, shared base, FSDP2 bf16), to prove the whole path runs on the device.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
WAN_1_3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30)


def init_process_group() -> None:
    import torch.distributed as dist

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29517")
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", rank=0, world_size=1)


def model_flops(params: int, tokens: int, layers: int, dim: int, text: int) -> float:
    """Forward FLOPs: 2·params·tokens for the matmuls, plus self-attention 4·T²·dim and cross-attention
    4·T·text·dim per layer."""
    return 2 * params * tokens + layers * (4 * tokens * tokens * dim + 4 * tokens * text * dim)


def transformer_step(latent: tuple[int, int, int], config: dict, steps: int, device) -> dict:
    """Median forward + backward time of one clip, peak memory, TFLOP/s."""
    from torch.distributed.device_mesh import init_device_mesh

    from anyflow.fsdp import shard_network
    from anyflow.memory import meta_network
    from anyflow.sampling import call_model

    init_process_group()
    network = meta_network(config)
    network.enable_gradient_checkpointing()
    mesh = init_device_mesh(device.type, (1,))
    shard_network(network, mesh, param_dtype=torch.bfloat16)
    network.to_empty(device=device)
    torch.manual_seed(0)
    with torch.no_grad():  # random weights (the figures do not depend on them)
        for param in network.parameters():
            param.normal_(0, 0.02) if param.dim() > 1 else param.zero_()
    _rebuild_rope(network, config, device)
    x = torch.randn(1, config["in_channels"], *latent, device=device)
    embeds = torch.randn(1, 512, config["text_dim"], device=device)
    t, r = torch.tensor([0.7], device=device), torch.tensor([0.3], device=device)
    times = []
    for step in range(steps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        call_model(network, x, t, r, embeds).float().square().mean().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step:  # the first step warms up (allocator, kernels)
            times.append(time.perf_counter() - start)
    params = sum(p.numel() for p in network.parameters())
    tokens = latent[0] * (latent[1] // config["patch_size"][1]) * (latent[2] // config["patch_size"][2])
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    flops = 4 * model_flops(params, tokens, config["num_layers"], dim, 512)  # forward, recompute, 2× backward
    seconds = statistics.median(times)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return {"params_m": params / 1e6, "tokens": tokens, "step_s": seconds, "peak_gib": peak,
            "tflops": flops / seconds / 1e12}


def _rebuild_rope(network, config: dict, device) -> None:
    """Rotary tables are buffers computed at construction; ``to_empty`` leaves them uninitialised."""
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    fresh = WanRotaryPosEmbed(config["attention_head_dim"], config["patch_size"], config.get("rope_max_seq_len", 1024))
    for name, buffer in fresh.named_buffers():
        getattr(network.rope, name).copy_(buffer.to(device))


def tiny_wan_runs(device_args: list[str]) -> list[tuple[str, float, int]]:
    """One pretrain and one on-policy iteration of train.py on a tiny Wan folder: ``(stage, seconds, exit code)``."""
    spec = importlib.util.spec_from_file_location("tiny_wan", ROOT / "tests" / "tiny_wan.py")
    tiny_wan = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny_wan)
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = tiny_wan.make_plain_wan(Path(tmp) / "wan")
        common = ["model=wan2.1_t2v_1.3b", f"model.path={folder}", "model.lora.student.rank=4", "model.lora.score.rank=4",
                  "data.num_frames=5", "data.size=16", "data.batch_size=1", "trainer.max_steps=1", "logger=none",
                  "callbacks.samples.every_n_steps=0", "callbacks.samples.nfe=[1]", f"paths.output_dir={tmp}/out",
                  "trainer=fsdp", "trainer.devices=1", *device_args]
        for stage, extra in (("teacher", ["init_from=base"]), ("pretrain", ["init_from=base"]),
                             ("onpolicy", ["model.shared_base=true", "stage.rollout_nfe=[4]"])):
            start = time.perf_counter()
            result = subprocess.run([sys.executable, str(ROOT / "train.py"), f"stage={stage}", *common, *extra],
                                    capture_output=True, text=True, cwd=ROOT)
            if result.returncode:
                print(result.stderr[-3000:])
            out.append((stage, time.perf_counter() - start, result.returncode))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a small shape on whatever device there is (CI)")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"[gpu_check] torch {torch.__version__} · {device} "
          f"{torch.cuda.get_device_name() if device.type == 'cuda' else ''}".rstrip())
    config, latent = dict(WAN_1_3B), (21, 60, 104)
    if args.smoke:
        config.update(num_attention_heads=2, attention_head_dim=16, ffn_dim=64, num_layers=2, text_dim=32)
        latent = (2, 4, 4)
    row = transformer_step(latent, config, args.steps, device)
    print(f"[gpu_check] flow-map Wan {row['params_m']:.0f} M params · {row['tokens']} tokens · FSDP2 bf16 + "
          f"checkpointing: {row['step_s'] * 1e3:.0f} ms per forward+backward · peak {row['peak_gib']:.1f} GiB · "
          f"{row['tflops']:.1f} TFLOP/s")
    failed = 0
    if not args.smoke:
        accel = ["trainer.accelerator=gpu"] if device.type == "cuda" else ["trainer.accelerator=cpu"]
        for stage, seconds, code in tiny_wan_runs(accel):
            print(f"[gpu_check] tiny Wan {stage}: {'ok' if code == 0 else f'FAILED ({code})'} in {seconds:.1f} s")
            failed += code != 0
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
