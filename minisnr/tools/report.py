"""The bench's report: the run's metadata and one-line header, and the markdown table of results.

minisnr.tools.bench prints them; minisnr.tools.gpucheck names the device with describe_device.
"""
import platform
from dataclasses import asdict

import torch

from .flops import peak_tflops, train_flops_per_image
from .memory import count_params


# --- the header --------------------------------------------------------------------------------

def describe_device(device):
    """A short human name for the device, for the bench table's header."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    return str(device)


def run_meta(cfg, c, device):
    """The run's metadata for the header and the JSON: device, torch, model, size, batch, FLOPs, MFU peak and
    every flag. cfg: the bench flags (BenchConfig); c: the DiTConfig."""
    return dict(device=describe_device(device), torch=torch.__version__, preset=cfg.preset, model=c.to_dict(),
                n_params=count_params(c), tokens=(c.img_size // c.patch_size) ** 2, batch_size=cfg.batch_size,
                flops_per_image=train_flops_per_image(c), peak_tflops=peak_tflops(device, cfg.peak_tflops),
                config=asdict(cfg))


def header_line(meta, c):
    """The line printed before timing: device, torch, model shape and size, batch and FLOPs per image.
    meta: bench's run metadata (device, torch, preset, tokens, n_params, batch_size, flops_per_image);
    c: the DiTConfig."""
    return (f"bench: {meta['device']} | torch {meta['torch']} | preset {meta['preset']} D={c.dim} L={c.depth} "
            f"heads={c.heads} p={c.patch_size} ({meta['tokens']} tokens, {meta['n_params'] / 1e6:.2f}M params) | "
            f"batch {meta['batch_size']} | {meta['flops_per_image'] / 1e9:.3f} GFLOP/img (fwd+bwd)")


# --- the table ---------------------------------------------------------------------------------

def format_table(results, device):
    """Markdown table of bench results; 'vs eager-fp32' is the img/s ratio to that row of the same run
    (on the CPU also the ratio of CPU time per step, which other jobs on the machine disturb less)."""
    base = next((r["img_per_s"] for r in results if r["mode"] == "eager-fp32"), None)
    base_cpu = next((r["cpu_ms_per_step"] for r in results if r["mode"] == "eager-fp32"), None)
    cuda = device.type == "cuda"
    cols = ["mode", "ms/step", "img/s", "vs eager-fp32", "GFLOP/img", "TFLOP/s", "compile s"]
    if device.type == "cpu":
        cols[2:2] = ["CPU ms/step"]
        cols[5:5] = ["vs eager-fp32 by CPU time"]
    if any(r.get("mfu") is not None for r in results):
        cols.append("MFU")
    if any("matmul_tflops" in r for r in results):
        cols += ["matmul TFLOP/s", "of matmul peak", "img/s ceiling"]
    if cuda:
        cols.append("peak mem GiB")
    if any("sample_ms_per_image" in r for r in results):
        cols.append("sample ms/img")
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(["---"] + ["---:"] * (len(cols) - 1)) + "|"]
    for r in results:
        row = {"mode": r["mode"], "ms/step": f"{r['ms_per_step']:.1f}", "CPU ms/step": f"{r['cpu_ms_per_step']:.1f}",
               "img/s": f"{r['img_per_s']:.2f}",
               "vs eager-fp32": f"{r['img_per_s'] / base:.2f}x" if base else "-",
               "vs eager-fp32 by CPU time": f"{base_cpu / r['cpu_ms_per_step']:.2f}x" if base_cpu else "-",
               "GFLOP/img": f"{r['flops_per_image'] / 1e9:.3f}", "TFLOP/s": f"{r['tflops']:.4f}",
               "compile s": f"{r['compile_s']:.1f}" if r["compile_s"] is not None else "-",
               "MFU": f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-",
               "matmul TFLOP/s": f"{r['matmul_tflops']:.4f}" if "matmul_tflops" in r else "-",
               "of matmul peak": f"{100 * r['tflops'] / r['matmul_tflops']:.0f}%" if "matmul_tflops" in r else "-",
               "img/s ceiling": f"{r['roofline_img_s']:.1f}" if "roofline_img_s" in r else "-",
               "peak mem GiB": f"{r['peak_mem_gib']:.2f}" if r.get("peak_mem_gib") is not None else "-",
               "sample ms/img": f"{r['sample_ms_per_image']:.1f}" if "sample_ms_per_image" in r else "-"}
        lines.append("| " + " | ".join(row[k] for k in cols) + " |")
    return "\n".join(lines)
