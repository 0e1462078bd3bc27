"""A folder of sample PNGs for FID tools, written by sample.py --png-dir and by `evaluate fid`.

    python sample.py runs/pretrain/ckpt.pt --png-dir runs/fid/samples --n 5000   # 50,000 PNGs; rerun to resume

File i is INDEX_CLASS.png (e.g. 000123_ship.png) of class class_ids[i % K], so any prefix is class-balanced.
Batch k of BATCH starts from the noise of seed `seed * SEED_STRIDE + k`, so its images depend only on the settings
and k: a rerun skips the files that exist and draws a missing one exactly as the first run would have. The
settings live in minisnr_samples.json; a rerun with others is refused: one folder, one model and one sampler.
"""
import os

from ..rf import generate
from .checkpoint import weights_hash
from .cli import UserError
from .device import autocast_context
from .files import check_writable, remove_stale_tmp, write_json
from .safety import check_out_not_input, read_small_json
from .images import save_png

SETTINGS_FILE = "minisnr_samples.json"
BATCH = 256                  # images per generate() call (a setting of the folder: it fixes each batch's seed)
SEED_STRIDE = 1_000_000      # batch k of seed s uses seed s * SEED_STRIDE + k: distinct for up to 1e6 batches


def file_names(settings):
    """The folder's file names, in sample order: INDEX_CLASS.png, classes cycling so any prefix is balanced."""
    names, n = settings["classes"], settings["per_class"] * len(settings["classes"])
    width = max(6, len(str(n - 1)))
    safe = ["".join(ch if ch.isalnum() or ch == "-" else "-" for ch in name) for name in names]
    return [f"{i:0{width}d}_{safe[i % len(names)]}.png" for i in range(n)]


def claim_folder(folder, settings, source, data=()):
    """Make `folder` ours for these settings: a new or empty folder gets the settings file, one with the same
    settings is resumed, anything else (files minisnr did not write, a folder inside `data`) is refused in one line."""
    check_out_not_input(folder, data, flag="--png-dir")
    path = os.path.join(folder, SETTINGS_FILE)
    if os.path.lexists(path):
        old = read_small_json(path)
        old = old.get("settings") if isinstance(old, dict) else None
        if not isinstance(old, dict):
            raise UserError(f"{path} is not a minisnr settings file; pass a new or empty folder")
        changed = [k for k in settings if old.get(k) != settings[k]]
        if changed:
            k = changed[0]
            raise UserError(f"{folder!r} holds samples made with {k}={old.get(k)!r}, not {settings[k]!r}; "
                            f"rerun with the same settings to resume, or pass a new folder")
        return
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    if names:  # a class folder of a data set, a run, a user's pictures: PNGs written there would join them
        what = "PNG files" if any(f.lower().endswith(".png") for f in names) else f"files ({', '.join(names[:3])})"
        raise UserError(f"{folder!r} already holds {what} but no {SETTINGS_FILE}; pass a new or empty folder")
    check_writable(folder, "--png-dir")
    write_json({"settings": settings, "ckpt": source, "files": len(file_names(settings)),
                "names": "INDEX_CLASS.png; sample i has class class_ids[i % len(class_ids)]",
                "noise": f"batch k (files k*batch ...) starts from seed seed*{SEED_STRIDE}+k"}, path)


def sample_to_folder(model, folder, classes, class_ids, per_class, *, steps, cfg, seed, ema, device, precision,
                     source="", data=()):
    """sample.py --png-dir and `evaluate fid`: draw every sample into `folder`, one PNG each, BATCH at a time, keeping
    the files already there. The folder may not lie in `data` ((what, folder) pairs: the data the model was trained
    on). Returns the number of files."""
    from PIL import Image
    from tqdm import tqdm
    # everything that decides the pixels, compared on resume; the weights by their hash, so a moved checkpoint matches
    settings = {"weights": weights_hash(model.state_dict()), "ema": ema, "classes": [classes[c] for c in class_ids],
                "class_ids": list(class_ids), "per_class": per_class, "steps": steps, "cfg": cfg, "seed": seed,
                "precision": precision, "batch": BATCH}
    claim_folder(folder, settings, source, data)
    remove_stale_tmp(folder)  # a killed run's half-written NAME.<random>.tmp files
    names, have = file_names(settings), set(os.listdir(folder))
    labels = [settings["class_ids"][i % len(settings["class_ids"])] for i in range(len(names))]
    todo = sum(name not in have for name in names)
    bar = tqdm(total=len(names), initial=len(names) - todo, unit="img", desc="samples")
    for k, start in enumerate(range(0, len(names), BATCH)):
        missing = [i for i in range(start, min(start + BATCH, len(names))) if names[i] not in have]
        if not missing:
            continue
        images = generate(model, labels[start:start + BATCH], steps=steps, cfg=cfg, seed=seed * SEED_STRIDE + k,
                          ctx=autocast_context(device, precision), batch_size=BATCH)
        for i in missing:  # (3, H, W) uint8 -> PNG, each written atomically
            save_png(Image.fromarray(images[i - start].permute(1, 2, 0).numpy()), os.path.join(folder, names[i]))
        bar.update(len(missing))
    bar.close()
    print(f"{folder}: {len(names)} PNGs ({todo} drawn now, {len(names) - todo} kept from before)")
    return len(names)
