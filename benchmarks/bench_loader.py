"""Streaming a large image folder: peak memory of `onebit train` and its images per second against a
plain DataLoader loop over the same files, with the same workers, model and batch size.

    python benchmarks/bench_loader.py --root /tmp/jpeg100k --images 100000 --size 96 --workers 2

The folder (ImageNet's layout: train/<class>/*.jpg, val/<class>/*.jpg) is generated on first use:
smooth random RGB images, about 3 KB each as JPEG. Two measurements:

1. memory: one whole epoch of `onebit train --loader-workers W` in a child process; the resident
   set (RSS) and the proportional set (PSS: shared pages split between the processes sharing them)
   of its whole process tree, loader workers included, sampled every 50 ms; the peaks are printed.
2. speed: the trainer's steps (`Trainer.train_epoch`, augmentation included) against a plain loop
   (a Dataset decoding with Pillow, resized to the size, torch's DataLoader with shuffle), the same
   model, optimizer and batch; `--steps` steps each, alternately, `--rounds` times; images per second
   and their ratio.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np


def make_folder(root: str, images: int, size: int, classes: int, seed: int = 0) -> None:
    """Generate ``images`` training JPEGs (and 1 % as many for val) in ImageNet's layout."""
    from concurrent.futures import ProcessPoolExecutor

    jobs = []
    for split, count in (("train", images), ("val", max(classes, images // 100))):
        for c in range(classes):
            n = count // classes + (1 if c < count % classes else 0)
            jobs.append((os.path.join(root, split, f"c{c:03d}"), n, size, seed * 1_000_003 + c * 7 + (split == "val")))
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
        list(pool.map(_write_class, jobs))


def _write_class(job) -> None:
    from PIL import Image

    folder, n, size, seed = job
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        small = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
        im = small.resize((size, size), Image.BILINEAR)
        im.save(os.path.join(folder, f"{i:06d}.jpg"), quality=90)


def tree_memory(pid: int) -> tuple[int, int]:
    """(RSS, PSS) in bytes summed over ``pid`` and its descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
            except (OSError, ValueError, IndexError):
                pass
    rss = pss = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Rss:"):
                        rss += int(line.split()[1]) * 1024
                    elif line.startswith("Pss:"):
                        pss += int(line.split()[1]) * 1024
        except OSError:
            pass
    return rss, pss


def measure_memory(command: list[str], seconds: float | None = None) -> tuple[int, int, float, int]:
    """Run ``command`` (stopped with SIGTERM after ``seconds`` when given: the trainer finishes its
    step, saves and exits); (peak RSS, peak PSS of its process tree, seconds, exit status)."""
    import signal

    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peaks = [0, 0]

    def sample():
        while proc.poll() is None:
            if seconds is not None and time.perf_counter() - start > seconds:
                proc.send_signal(signal.SIGTERM)
                break
            rss, pss = tree_memory(proc.pid)
            peaks[0], peaks[1] = max(peaks[0], rss), max(peaks[1], pss)
            time.sleep(0.05)
        while proc.poll() is None:  # after the stop request: until the run has saved and exited
            rss, pss = tree_memory(proc.pid)
            peaks[0], peaks[1] = max(peaks[0], rss), max(peaks[1], pss)
            time.sleep(0.05)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    output, _ = proc.communicate()
    thread.join()
    if proc.returncode:
        print(output[-3000:])
    return peaks[0], peaks[1], time.perf_counter() - start, proc.returncode


class PlainFolder:
    """What a user writes: Pillow decode, resize to the size, to a normalized float tensor."""

    def __init__(self, files, labels, size):
        self.files, self.labels, self.size = files, labels, size

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        import torch
        from PIL import Image

        with Image.open(self.files[i]) as im:
            a = np.asarray(im.convert("RGB").resize((self.size, self.size), Image.BILINEAR), dtype=np.float32)
        x = torch.from_numpy(a).permute(2, 0, 1) / 255.0
        return (x - 0.5) / 0.25, int(self.labels[i])


def measure_speed(args) -> None:
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    from onebit import models
    from onebit.train import TrainConfig, Trainer

    class Bench(Trainer):
        """Stops its epoch after step ``limit``."""

        limit = 0

        def on_step_end(self):
            if self.step >= self.limit:
                self.request_stop()

    config = TrainConfig(
        model=args.model,
        data=args.root,
        image_size=args.size,
        epochs=1,
        batch_size=args.batch_size,
        loader_workers=args.workers,
        model_kwargs={},
        lr=1e-3,
    )
    trainer = Bench.from_config(config)
    source = trainer.data.train.source
    files = [source.path(i) for i in range(len(source))]
    plain_model = models.create(args.model, num_classes=trainer.data.num_classes, in_channels=3)
    opt = torch.optim.Adam(plain_model.parameters(), lr=1e-3)
    loader = DataLoader(
        PlainFolder(files, source.labels.numpy(), args.size),
        batch_size=args.batch_size,
        shuffle=True,
        num_workers=args.workers,
        persistent_workers=args.workers > 0,
        drop_last=True,
    )
    plain_iter = iter(loader)

    def onebit_steps(n: int) -> float:
        trainer.limit = min(trainer.step + n, trainer.steps_per_epoch - 1)
        start = time.perf_counter()
        trainer.train_epoch(0)
        trainer._stop_signal = None
        return time.perf_counter() - start

    def plain_steps(n: int) -> float:
        nonlocal plain_iter
        plain_model.train()
        start = time.perf_counter()
        for _ in range(n):
            try:
                x, y = next(plain_iter)
            except StopIteration:
                plain_iter = iter(loader)
                x, y = next(plain_iter)
            loss = F.cross_entropy(plain_model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return time.perf_counter() - start

    onebit_steps(args.warmup)
    plain_steps(args.warmup)
    rates = {"onebit": [], "plain": []}
    for r in range(args.rounds):
        for name, fn in (
            (("onebit", onebit_steps), ("plain", plain_steps))
            if r % 2 == 0
            else (("plain", plain_steps), ("onebit", onebit_steps))
        ):
            rates[name].append(args.steps * args.batch_size / fn(args.steps))
    a, b = np.median(rates["onebit"]), np.median(rates["plain"])
    print(
        f"speed ({args.model}, {args.size} px, batch {args.batch_size}, {args.workers} loader workers, "
        f"{args.steps} steps x {args.rounds} rounds):"
    )
    print(f"  onebit trainer     {a:8.1f} images/s  (rounds: {', '.join(f'{v:.1f}' for v in rates['onebit'])})")
    print(f"  plain DataLoader   {b:8.1f} images/s  (rounds: {', '.join(f'{v:.1f}' for v in rates['plain'])})")
    print(f"  ratio onebit / plain: {a / b:.3f}")
    trainer.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=os.path.join(tempfile.gettempdir(), "onebit-jpeg100k"))
    p.add_argument("--images", type=int, default=100_000)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--model", default="lenet_binary")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument(
        "--memory-seconds",
        type=float,
        default=None,
        help="stop the memory run after this many seconds (SIGTERM) instead of after its epoch",
    )
    p.add_argument("--skip", choices=["memory", "speed"], default=None, help="skip one of the two measurements")
    args = p.parse_args()
    if not os.path.isdir(os.path.join(args.root, "train")):
        start = time.perf_counter()
        make_folder(args.root, args.images, args.size, args.classes)
        print(
            f"generated {args.images} JPEGs of {args.size}x{args.size} in {args.root} "
            f"({time.perf_counter() - start:.0f} s)"
        )
    float_gb = args.images * 3 * args.size * args.size * 4 / 1e9
    if args.skip != "memory":
        with tempfile.TemporaryDirectory() as out:
            onebit = [
                sys.executable,
                "-m",
                "onebit",
                "train",
                "--model",
                args.model,
                "--data",
                args.root,
                "--epochs",
                "1",
                "--batch-size",
                str(args.batch_size),
                "--loader-workers",
                str(args.workers),
                "--out",
                out,
            ]
            rss, pss, seconds, status = measure_memory(onebit, args.memory_seconds)
        what = "one epoch" if args.memory_seconds is None else f"the first {args.memory_seconds:.0f} s of an epoch"
        print(
            f"memory: {what} of `onebit train` on {args.images} images ({float_gb:.1f} GB as float32), "
            f"{args.workers} loader workers, batch {args.batch_size}, {seconds:.0f} s, exit {status}:"
        )
        print(f"  peak RSS of the process tree {rss / 1e9:.2f} GB, peak PSS {pss / 1e9:.2f} GB")
    if args.skip != "speed":
        measure_speed(args)


if __name__ == "__main__":
    main()
