"""Preprocess throughput (images/s) on a folder of real-size PNGs made from the shared data.

``python -m bench.preprocess_bench --images 3000 --size 512 --workdir /tmp/lx-bench`` prints the
result as JSON; ``make bench`` calls :func:`bench_preprocess`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from lungxray import prepare

SHARED_NPZ = Path(__file__).resolve().parents[1].parent / "shared" / "data" / \
    "pneumoniamnist_28_trainval.npz"
CLASSES = ("NORMAL", "PNEUMONIA")


def make_png_folder(n_images: int, size: int, root: Path, source: Path = SHARED_NPZ,
                    seed: int = 0) -> Path:
    """``root/<CLASS>/*.png``: real X-rays upscaled to ``size`` px with mild seeded noise (so the
    files compress like real scans, not like smooth upscales). Reused when already complete."""
    if root.is_dir() and sum(1 for _ in root.rglob("*.png")) == n_images:
        return root
    with np.load(source, allow_pickle=False) as archive:
        images, labels = archive["train_images"], archive["train_labels"].reshape(-1)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(images))  # the file's first images are all one class
    for name in CLASSES:
        (root / name).mkdir(parents=True, exist_ok=True)
    for i in range(n_images):
        k = order[i % len(images)]  # cycles past 4708 images: later copies differ by noise
        big = np.asarray(Image.fromarray(images[k]).resize((size, size),
                                                           Image.Resampling.BICUBIC), np.float32)
        noisy = np.clip(big + rng.normal(0, 2.0, big.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(root / CLASSES[labels[k]] / f"{i:06d}.png")
    return root


def bench_preprocess(n_images: int, size: int, workdir: Path, image_size: int | None = None,
                     workers: int = 0) -> dict:
    """Generate (or reuse) ``n_images`` PNGs of ``size`` px under ``workdir`` and time
    ``prepare.preprocess`` on them; returns images, seconds, images_per_s and the settings."""
    workdir = Path(workdir)
    started = time.perf_counter()
    folder = make_png_folder(n_images, size, workdir / f"png{size}x{n_images}")
    generated = time.perf_counter() - started
    output = workdir / "prepared"
    started = time.perf_counter()
    manifest = prepare.preprocess(str(folder), output, image_size=image_size, workers=workers)
    seconds = time.perf_counter() - started
    source_mib = sum(p.stat().st_size for p in folder.rglob("*.png")) / 2**20
    return {"images": n_images, "seconds": round(seconds, 2),
            "images_per_s": round(n_images / seconds, 1),
            "settings": {"source": f"{n_images} PNG {size}x{size} grey 8-bit, "
                                   f"{source_mib:.0f} MiB",
                         "image_size": manifest["image_size"], "channels": manifest["channels"],
                         "workers": workers or min(8, os.cpu_count() or 1),
                         "cpus": os.cpu_count(), "generate_seconds": round(generated, 1)}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--image-size", type=int, default=None,
                        help="prepared size (default: preprocess's own, 224 for folders)")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--workdir", type=Path, required=True)
    args = parser.parse_args(argv)
    result = bench_preprocess(args.images, args.size, args.workdir, args.image_size, args.workers)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
