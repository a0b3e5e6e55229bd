"""Augmented views per second of the training input, host-side (tf.data) and device-side (JAX).

    python -m benchmarks.input_pipeline                    # every case, this process's cores
    taskset -c 0 python -m benchmarks.input_pipeline       # the same on one core

Cases, each for pretraining (two views: crop, flip, colour jitter, grayscale, blur) and fine-tuning
(one view: crop + flip):

* ``224``: JPEGs written by the benchmark (500x375, the size of a typical ImageNet photo), read as a
  streamed source: the host decodes and augments each view (``host``, with and without blur), or
  decodes and resizes to 256x256 for the device (``host_resize_for_device``); ``device`` is the
  JAX augmentation of those fixed-size images inside a jitted function, on this machine's backend.
* ``28`` and ``32``: in-memory arrays (Fashion-MNIST and CIFAR sizes), host tf.data augmentation
  against device augmentation of the stored uint8 images.

``--end_to_end`` instead trains the default Fashion-MNIST pretraining (the default job's first stage)
for ``--steps`` steps with the augmentations on the host and then on the device, and reports the
steady-state steps/s of each (the first 5 steps, compilation included, are not timed): the
measurement behind the CPU backend's automatic choice. Written to ``input_pipeline_end_to_end_*.json``.

Writes ``benchmarks/results/input_pipeline_<backend>_<N>cores.json`` with views/s (and per core),
the machine (CPU model and flags), and the step rates the input must feed: this machine's measured
train steps (``benchmarks/results/train_step_*.json``, where present).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import glob
import io
import json
import os
import platform
import time

import numpy as np

from benchmarks.common import cpu_info

# Step rates measured elsewhere that the input must keep up with (not measured by this benchmark).
REPORTED_STEP_RATES = {
    "r50_1x_bf16_pretraining_one_h100": {
        "views_per_s": 5000,
        "source": "the project's own measurement with benchmarks/train_step.py on one H100, synthetic "
        "input, global batch 256-512 (about 4,800-5,200 views/s); not measured in this run",
    }
}


def _jpegs(n: int, height: int = 375, width: int = 500) -> list[bytes]:
    """Smooth random colour images (JPEG-compressible like photos), encoded with PIL."""
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        small = rng.integers(0, 256, size=(height // 25 + 1, width // 25 + 1, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((width, height), Image.BICUBIC)
        noise = rng.normal(0, 12, size=(height, width, 3))
        pixels = np.clip(np.asarray(image, np.float32) + noise, 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


class JpegSource:
    """A streamed source of encoded JPEGs, as a tfds data set with ``decode=False`` gives them."""

    name, num_classes, image_shape, in_memory = "jpegs", 10, (None, None, 3), False

    def __init__(self, encoded: list[bytes]):
        self.encoded = encoded

    def num_examples(self, split):
        return len(self.encoded)

    def shard_bounds(self, split, shard_index, num_shards):
        n = len(self.encoded)
        return np.arange(n * shard_index // num_shards, n * (shard_index + 1) // num_shards)

    def load(self, split, *, shard_index=0, num_shards=1, decode=True, ordered=True):
        from simclrv2_jax.data.tf_cpu import tf

        index = self.shard_bounds(split, shard_index, num_shards)
        data = {
            "image": np.asarray([self.encoded[i] for i in index], object),
            "label": index % 10,
            "index": index,
        }
        return tf.data.Dataset.from_tensor_slices(data)

    def decode_image(self, image):
        from simclrv2_jax.data.tf_cpu import tf

        return tf.io.decode_jpeg(image, channels=3)


def _resize_for_device_rate(jpegs, args) -> float:
    """Views/s of the tf.data stream that only decodes and resizes to 256 px (the device augments)."""
    from simclrv2_jax.data import augment

    return _host_rate(
        jpegs,
        views=1,
        preprocess=lambda image, seed: augment.resize(image, 256, 256),
        image_size=256,
        batch=args.batch,
        seconds=args.seconds,
    )


def _host_rate(source, *, views: int, preprocess, image_size: int, batch: int, seconds: float) -> float:
    from simclrv2_jax.data import pipeline

    ds = pipeline.train_dataset(
        source,
        "train",
        local_batch_size=batch,
        seed=0,
        num_views=views,
        image_size=image_size,
        preprocess=preprocess,
    )
    it = ds.as_numpy_iterator()
    next(it)  # warm-up (graph tracing, shuffle buffer)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        next(it)
        count += batch * views
    return count / (time.perf_counter() - start)


def _device_rate(
    images: np.ndarray, *, views: int, contrastive: bool, use_blur: bool, image_size: int, seconds: float
):
    import jax

    from simclrv2_jax.data import device_augment

    def augment(x, key):
        keys = jax.random.split(key, views)
        return [
            device_augment.preprocess_for_train(
                x,
                k,
                height=image_size,
                width=image_size,
                color_jitter_strength=1.0 if contrastive else 0.0,
                use_blur=use_blur,
                color_distort=contrastive,
            )
            for k in keys
        ]

    fn = jax.jit(augment)
    x = jax.device_put(images)
    jax.block_until_ready(fn(x, jax.random.key(0)))
    count, start, step = 0, time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        step += 1
        jax.block_until_ready(fn(x, jax.random.key(step)))
        count += len(images) * views
    return count / (time.perf_counter() - start)


def folder_rates(encoded: list[bytes], *, batch: int, seconds: float) -> list[dict]:
    """Views/s from a folder of JPEGs (``dataset="image_folder"``): decoded and resized to 256 for the
    device without TensorFlow (Pillow in threads), and decoded and augmented on the host with it
    (tf.data around the same decoder), next to the tfds-style stream of the same JPEGs."""
    import shutil
    import tempfile

    from simclrv2_jax.data import augment, folder_pipeline, pipeline
    from simclrv2_jax.data.folders import FolderSource

    root = tempfile.mkdtemp(prefix="simclr_folders_")
    try:
        for i, data in enumerate(encoded):
            folder = os.path.join(root, "train", f"class{i % 10}")
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, f"{i:06d}.jpg"), "wb") as f:
                f.write(data)
        source = FolderSource(root, labeled_splits=["train"])
        rows = []

        def timed(batches, views):
            next(batches)  # warm-up
            count, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds:
                next(batches)
                count += batch * views
            return count / (time.perf_counter() - start)

        shard = dict(local_batch_size=batch, seed=0)
        numpy_batches = folder_pipeline.train_batches(source, "train", size=256, **shard)
        rows.append(
            dict(where="folder_decode_resize_for_device_no_tf", views=1, views_per_s=timed(numpy_batches, 1))
        )
        for stage, views, contrastive in (("pretrain", 2, True), ("finetune", 1, False)):

            def preprocess(image, seed, contrastive=contrastive):
                return augment.preprocess_for_train(
                    image,
                    seed,
                    height=224,
                    width=224,
                    color_jitter_strength=1.0 if contrastive else 0.0,
                    use_blur=False,
                    color_distort=contrastive,
                )

            ds = pipeline.train_dataset(
                source, "train", num_views=views, image_size=224, preprocess=preprocess, **shard
            )
            rows.append(
                dict(where=f"folder_host_tf_{stage}", views=views, views_per_s=timed(iter(ds), views))
            )
        return rows
    finally:
        shutil.rmtree(root, ignore_errors=True)


def listing_time(num_files: int, per_folder: int = 1000) -> dict:
    """Seconds to list a labeled split of ``num_files`` (empty) image files in folders of
    ``per_folder``, afresh and from the kept index (checked against every folder's time)."""
    import shutil
    import tempfile

    from simclrv2_jax.data import folders

    root = tempfile.mkdtemp(prefix="simclr_listing_")
    try:
        split = os.path.join(root, "train")
        t0 = time.perf_counter()
        for i in range(num_files):
            folder = os.path.join(
                split, f"class{i // per_folder % 100:03d}", f"part{i // (per_folder * 100)}"
            )
            if i % per_folder == 0:
                os.makedirs(folder, exist_ok=True)
            open(os.path.join(folder, f"{i:07d}.jpg"), "wb").close()
        created = time.perf_counter() - t0
        home = os.path.join(root, "run")
        with folders.index_home(home):
            t0 = time.perf_counter()
            first = folders.load_index(split, labeled=True)
            fresh = time.perf_counter() - t0
            t0 = time.perf_counter()
            again = folders.load_index(split, labeled=True)
            kept = time.perf_counter() - t0
        assert len(first.paths) == len(again.paths) == num_files
        return {
            "files": num_files,
            "folders": len(first.folders),
            "classes": len(first.classes),
            "seconds_to_create": created,
            "seconds_to_list_and_keep": fresh,
            "seconds_from_kept_index": kept,
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _stamp(times: dict, step: int, state) -> None:
    times[step] = time.perf_counter()


def end_to_end(steps: int, data_dir: str) -> dict:
    """Steady-state steps/s of the default pretraining with host and with device augmentation."""
    import shutil
    import tempfile

    from simclrv2_jax.config import get_config
    from simclrv2_jax.train import train_stage

    rates = {}
    for on_device in (False, True):
        config = get_config("pretrain", "fashion_mnist")
        config.train_steps, config.augment_on_device, config.log_every_steps = steps, on_device, 1000
        config.lineareval_while_pretraining = True
        config.data_dir = data_dir
        times = {}
        workdir = tempfile.mkdtemp(prefix="simclr_e2e_")
        try:
            train_stage(config, workdir, step_hooks=[functools.partial(_stamp, times)])
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        rates["device" if on_device else "host"] = (steps - 5) / (times[steps] - times[5])
        print(
            json.dumps(
                {"augment_on_device": on_device, "steps_per_s": rates["device" if on_device else "host"]}
            )
        )
    return rates


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--end_to_end", action="store_true", help="time the default pretraining both ways")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument(
        "--data_dir", default="", help="Fashion-MNIST IDX files (default: the Debian package)"
    )
    parser.add_argument("--seconds", type=float, default=8.0, help="measuring time per case")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--num_jpegs", type=int, default=256)
    parser.add_argument("--out", default=None)
    parser.add_argument(
        "--folders", action="store_true", help="image folders: views/s with and without TF, listing time"
    )
    parser.add_argument(
        "--list_files", type=int, default=1_000_000, help="files the listing benchmark writes"
    )
    args = parser.parse_args()

    import jax

    here = os.path.dirname(__file__)
    cores = len(os.sched_getaffinity(0))
    if args.folders:
        rows = [
            dict(row, views_per_s_per_core=row["views_per_s"] / cores)
            for row in folder_rates(_jpegs(args.num_jpegs), batch=args.batch, seconds=args.seconds)
        ]
        jpegs = JpegSource(_jpegs(args.num_jpegs))
        from simclrv2_jax.data import augment

        rate = _resize_for_device_rate(jpegs, args)
        rows.append(
            dict(
                where="tfds_style_stream_resize_for_device",
                views=1,
                views_per_s=rate,
                views_per_s_per_core=rate / cores,
            )
        )
        for row in rows:
            print(json.dumps(row))
        listing = listing_time(args.list_files)
        print(json.dumps(listing))
        payload = {
            "benchmark": "input_pipeline_folders",
            "what": "500x375 JPEGs in class folders: decoded views/s (224 px; 256 px for the device), "
            "and the time to list a split of many files",
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "backend": jax.default_backend(),
            "machine": cpu_info(),
            "cores": cores,
            "rows": rows,
            "listing": listing,
        }
        out = args.out or os.path.join(
            here, "results", f"input_pipeline_folders_{jax.default_backend()}.json"
        )
        with open(out, "w") as f:
            json.dump(payload, f, indent=2)
        print(f"wrote {out}")
        return
    if args.end_to_end:
        rates = end_to_end(args.steps, args.data_dir)
        payload = {
            "benchmark": "input_pipeline_end_to_end",
            "what": "default Fashion-MNIST pretraining (batch 256, 28 px, R18 0.25x), steady-state steps/s",
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "backend": jax.default_backend(),
            "machine": cpu_info(),
            "steps": args.steps,
            "steps_per_s": rates,
            "faster": max(rates, key=rates.get),
        }
        out = args.out or os.path.join(
            here, "results", f"input_pipeline_end_to_end_{jax.default_backend()}.json"
        )
        with open(out, "w") as f:
            json.dump(payload, f, indent=2)
        print(f"wrote {out}")
        return

    from simclrv2_jax.data import augment
    from simclrv2_jax.data.sources import InMemorySource

    results: list[dict] = []

    def record(**row):
        row["views_per_s_per_core"] = row["views_per_s"] / cores
        results.append(row)
        print(json.dumps(row))

    def train_preprocess(size, contrastive, blur):
        return lambda image, seed: augment.preprocess_for_train(
            image,
            seed,
            height=size,
            width=size,
            color_jitter_strength=1.0 if contrastive else 0.0,
            use_blur=blur,
            color_distort=contrastive,
        )

    stages = (("pretrain", 2, True), ("finetune", 1, False))
    jpegs = JpegSource(_jpegs(args.num_jpegs))
    for stage, views, contrastive in stages:
        for blur in (True, False) if contrastive else (False,):
            rate = _host_rate(
                jpegs,
                views=views,
                preprocess=train_preprocess(224, contrastive, blur),
                image_size=224,
                batch=args.batch,
                seconds=args.seconds,
            )
            record(case="224", stage=stage, where="host", blur=blur, views_per_s=rate)
    rate = _resize_for_device_rate(jpegs, args)
    record(
        case="224",
        stage="any",
        where="host_resize_for_device",
        blur=False,
        images_per_s=rate,
        views_per_s=rate,
    )
    fixed = np.random.default_rng(0).integers(0, 256, size=(args.batch, 256, 256, 3), dtype=np.uint8)
    for stage, views, contrastive in stages:
        for blur in (True, False) if contrastive else (False,):
            rate = _device_rate(
                fixed,
                views=views,
                contrastive=contrastive,
                use_blur=blur,
                image_size=224,
                seconds=args.seconds,
            )
            record(case="224", stage=stage, where="device", blur=blur, views_per_s=rate)

    for size in (28, 32):
        images = np.random.default_rng(1).integers(0, 256, size=(4096, size, size, 3), dtype=np.uint8)
        labels = np.arange(4096) % 10
        source = InMemorySource(name=f"random{size}", num_classes=10, data={"train": (images, labels)})
        for stage, views, contrastive in stages:
            rate = _host_rate(
                source,
                views=views,
                preprocess=train_preprocess(size, contrastive, False),
                image_size=size,
                batch=256,
                seconds=args.seconds,
            )
            record(case=str(size), stage=stage, where="host", blur=False, views_per_s=rate)
            rate = _device_rate(
                images[:256],
                views=views,
                contrastive=contrastive,
                use_blur=False,
                image_size=size,
                seconds=args.seconds,
            )
            record(case=str(size), stage=stage, where="device", blur=False, views_per_s=rate)

    step_rates = dict(REPORTED_STEP_RATES)
    for path in sorted(glob.glob(os.path.join(here, "results", "train_step_*.json"))):
        with open(path) as f:
            step = json.load(f)
        step_rates[os.path.basename(path)] = {
            "backend": step.get("backend"),
            "device_kind": step.get("device_kind"),
            "views_per_s": step.get("images_per_s"),
        }
    end_to_end_path = os.path.join(here, "results", "input_pipeline_end_to_end_cpu.json")
    if os.path.exists(end_to_end_path):
        with open(end_to_end_path) as f:
            e2e = json.load(f)
        step_rates["default_pretraining_this_cpu"] = {
            "source": os.path.basename(end_to_end_path),
            "views_per_s": {k: 2 * 256 * v for k, v in e2e["steps_per_s"].items()},
        }
    payload = {
        "benchmark": "input_pipeline",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "backend": jax.default_backend(),
        "machine": cpu_info(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "settings": {"seconds": args.seconds, "batch": args.batch, "jpeg_size": [375, 500]},
        "results": results,
        "step_rates_to_feed": step_rates,
    }
    out = args.out or os.path.join(
        here, "results", f"input_pipeline_{jax.default_backend()}_{cores}cores.json"
    )
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(payload, f, indent=2)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
