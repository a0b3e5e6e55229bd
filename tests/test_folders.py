"""Image folders (``dataset="image_folder"``): listing, the kept index, formats, bad files, label lists,
the input order with and without TensorFlow, and every stage on folders the tests write."""

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_MODEL, read_idx_gz, subprocess_env, tiny
from PIL import Image

from simclrv2_jax.config import get_config
from simclrv2_jax.data import array_pipeline, folder_pipeline, folders, pipeline
from simclrv2_jax.data.folders import BadImageError, FolderSource, decode_image_file

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("cat", "dog", "eel")


def write_folders(root, *, per_class=4, size=16, unlabeled=5, seed=0):
    """train/ and test/ with PNG class folders (images in nested folders too), unlabeled/ with nested
    RGB JPEGs of mixed sizes, plus files to ignore; returns {relative path: pixel array}."""
    rng = np.random.default_rng(seed)
    written = {}
    for split in ("train", "test"):
        for label, name in enumerate(CLASSES):
            for i in range(per_class):
                folder = Path(root, split, name, "deeper" if i % 2 else "")
                folder.mkdir(parents=True, exist_ok=True)
                array = np.full((size, size, 3), 40 * label + 10 * i, np.uint8)
                array[: size // 2] = rng.integers(0, 256, (size // 2, size, 3), dtype=np.uint8)
                path = folder / f"img{i}.png"
                Image.fromarray(array).save(path)
                written[str(path.relative_to(root))] = array
        Path(root, split, "README.txt").write_text("not an image")
        Path(root, split, CLASSES[0], ".hidden.png").write_bytes(b"")
    for i in range(unlabeled):
        folder = Path(root, "unlabeled", f"batch{i % 2}", "x")
        folder.mkdir(parents=True, exist_ok=True)
        side = 12 + 3 * i
        array = rng.integers(0, 256, (side, side + 5, 3), dtype=np.uint8)
        Image.fromarray(array).save(folder / f"u{i}.JPG", quality=95)
    return written


def source_of(root, **kwargs):
    return FolderSource(str(root), labeled_splits=["train", "test"], **kwargs)


# ------------------------------------------------------------------------------------------------
# Listing and the index.


def test_class_folders_give_sorted_labels_and_images_at_any_depth(tmp_path):
    written = write_folders(tmp_path)
    source = source_of(tmp_path)
    assert source.class_names == CLASSES and source.num_classes == 3
    paths = source.relative_paths("train")
    assert paths == sorted(p.split("/", 1)[1] for p in written if p.startswith("train/"))
    labels = source.labels("train")
    assert [CLASSES[label] for label in labels] == [p.split("/")[0] for p in paths]
    assert source.num_examples("unlabeled") == 5 and set(source.labels("unlabeled")) == {-1}
    assert source.training_split("train") == "train+unlabeled"
    assert source.num_examples("train+unlabeled") == 12 + 5
    index = source._index("train")
    assert index.ignored == 2  # README.txt, .hidden.png


def test_the_index_is_kept_and_listed_again_when_a_folder_changes(tmp_path):
    write_folders(tmp_path / "data")
    home = tmp_path / "run"
    with folders.index_home(home):
        first = source_of(tmp_path / "data")
        kept = sorted((home / folders.INDEX_SUBDIR).iterdir())
        assert len(kept) == 2  # train and test
        stamp = [p.stat().st_mtime_ns for p in kept]
        again = source_of(tmp_path / "data")
        assert again.relative_paths("train") == first.relative_paths("train")
        assert [p.stat().st_mtime_ns for p in kept] == stamp  # read, not written
        time.sleep(0.01)
        Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "data" / "train" / "dog" / "new.png")
        changed = source_of(tmp_path / "data")
        assert "dog/new.png" in changed.relative_paths("train")


def test_folder_mistakes_are_one_error_naming_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="the image folder does not exist"):
        source_of(tmp_path / "nowhere")
    write_folders(tmp_path / "a")
    source = source_of(tmp_path / "a")
    with pytest.raises(FileNotFoundError, match=r"no split 'validation' .* it has test, train, unlabeled"):
        source.num_examples("validation")
    shutil.rmtree(tmp_path / "a" / "train" / "eel")
    shutil.rmtree(tmp_path / "a" / "train" / "dog")
    with pytest.raises(ValueError, match=r"has 1 class folder\(s\) \(cat\)"):
        source_of(tmp_path / "a")
    write_folders(tmp_path / "b")
    (tmp_path / "b" / "train" / "empty").mkdir()
    with pytest.raises(ValueError, match=r"class folder .*train/empty holds no images"):
        source_of(tmp_path / "b")
    write_folders(tmp_path / "c")
    shutil.copytree(tmp_path / "c" / "test" / "eel", tmp_path / "c" / "test" / "fox")
    with pytest.raises(ValueError, match=r"missing none, extra \['fox'\]"):
        source_of(tmp_path / "c")
    with pytest.raises(ValueError, match="needs labels, but .*unlabeled is an unlabeled split"):
        source.require_labels("unlabeled", "Fine-tuning")


# ------------------------------------------------------------------------------------------------
# Formats.


def test_every_format_and_mode_decodes_to_rgb(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (6, 9, 3), dtype=np.uint8)
    gray = rng.integers(0, 256, (6, 9), dtype=np.uint8)

    def save(name, image, **kwargs):
        image.save(tmp_path / name, **kwargs)
        return decode_image_file(str(tmp_path / name))

    np.testing.assert_array_equal(save("a.png", Image.fromarray(rgb)), rgb)
    np.testing.assert_array_equal(save("b.bmp", Image.fromarray(rgb)), rgb)
    np.testing.assert_array_equal(save("c.webp", Image.fromarray(rgb), lossless=True), rgb)
    np.testing.assert_array_equal(save("d.png", Image.fromarray(gray)), np.repeat(gray[..., None], 3, -1))
    rgba = np.concatenate([rgb, np.full((6, 9, 1), 7, np.uint8)], -1)
    np.testing.assert_array_equal(save("e.png", Image.fromarray(rgba, "RGBA")), rgb)  # alpha dropped
    sixteen = (gray.astype(np.uint16) * 257).astype(np.uint16)
    np.testing.assert_array_equal(save("f.png", Image.fromarray(sixteen)), np.repeat(gray[..., None], 3, -1))
    palette = Image.fromarray(rgb).quantize(colors=16)
    expected = np.asarray(palette.convert("RGB"))
    np.testing.assert_array_equal(save("g.png", palette), expected)
    frames = [Image.fromarray(np.full((6, 9, 3), v, np.uint8)).quantize(colors=4) for v in (30, 200)]
    frames[0].save(tmp_path / "h.gif", save_all=True, append_images=frames[1:])
    np.testing.assert_array_equal(
        decode_image_file(str(tmp_path / "h.gif")), np.asarray(frames[0].convert("RGB"))
    )
    cmyk = Image.fromarray(rgb).convert("CMYK")
    np.testing.assert_array_equal(save("i.tif.jpg", cmyk, quality=100).shape, (6, 9, 3))
    exif = Image.Exif()
    exif[0x0112] = 6  # the camera was turned: display rotated 90 degrees clockwise
    rotated = save("j.png", Image.fromarray(rgb), exif=exif)
    np.testing.assert_array_equal(rotated, np.rot90(rgb, k=-1))


def test_a_bad_file_is_named_or_skipped_and_counted(tmp_path):
    write_folders(tmp_path)
    bad = tmp_path / "train" / "cat" / "img0.png"
    bad.write_bytes(bad.read_bytes()[:40])  # truncated
    (tmp_path / "train" / "dog" / "zero.png").write_bytes(b"")  # empty
    source = source_of(tmp_path)
    paths = source.image_paths("train")
    position = paths.index(str(bad))
    with pytest.raises(BadImageError, match=r"img0.png does not decode .* --config.skip_bad_images=True"):
        source.decode(paths, position)
    skipping = source_of(tmp_path, skip_bad_images=True)
    replaced = skipping.decode(paths, position)
    np.testing.assert_array_equal(replaced, decode_image_file(paths[position + 1]))  # the next file
    skipping.decode(paths, paths.index(str(tmp_path / "train" / "dog" / "zero.png")))
    assert skipping.info()["skipped_bad_images"] == 2


def test_a_label_list_picks_the_named_images(tmp_path):
    from simclrv2_jax.train import inputs

    write_folders(tmp_path / "data")
    source = source_of(tmp_path / "data")
    listing = tmp_path / "labels.txt"
    listing.write_text("# two\ndog/img0.png\n\neel/deeper/img1.png\n")
    chosen = inputs.listed_indices(str(listing), source, "train")
    assert [source.relative_paths("train")[i] for i in chosen] == ["dog/img0.png", "eel/deeper/img1.png"]
    listing.write_text("dog/nope.png\n")
    with pytest.raises(
        ValueError, match=r"names 1 image\(s\) that split 'train' does not hold, e.g. dog/nope.png"
    ):
        inputs.listed_indices(str(listing), source, "train")


# ------------------------------------------------------------------------------------------------
# The input order, with and without TensorFlow.


def test_both_inputs_give_a_step_the_same_images_and_resume_exactly(tmp_path):
    write_folders(tmp_path, per_class=5)
    source = source_of(tmp_path)
    shard = dict(local_batch_size=4, seed=3, process_index=0, process_count=1)
    numpy_batches = folder_pipeline.train_batches(source, "train", size=16, **shard)
    tf_batches = pipeline.train_dataset(
        source, "train", num_views=1, image_size=16, preprocess=lambda image, seed: image, **shard
    )
    first = [next(numpy_batches) for _ in range(6)]  # 24 images: more than an epoch of 15
    seen = [b for _, b in zip(range(6), array_pipeline.numpy_batches(tf_batches))]
    for a, b in zip(first, seen):
        np.testing.assert_array_equal(a["label"], b["label"])
        np.testing.assert_allclose(a["image"] / 255.0, b["image"], atol=1e-7)
    resumed = folder_pipeline.train_batches(source, "train", size=16, start_step=4, **shard)
    for want in first[4:]:
        got = next(resumed)
        np.testing.assert_array_equal(got["image"], want["image"])


# ------------------------------------------------------------------------------------------------
# Whole stages on folders.


def folder_config(stage, presets, root, **overrides):
    config = tiny(get_config(stage, presets), root, train_steps=2, **overrides)
    config.dataset = "image_folder"
    config.train_split, config.eval_split = "train", "test"
    config.eval_batch_size = 8
    config.train_batch_size = 8
    return config


@pytest.mark.slow
@pytest.mark.parametrize("tensorflow", [True, False])
def test_every_stage_and_evaluate_on_folders(tmp_path, tensorflow, jax_compile_cache):
    """The pipeline (pretraining on train + unlabeled, fine-tuning, distillation, baseline) and
    evaluate, as commands, on the folders above with a truncated JPEG skipped; without TensorFlow the
    subprocess cannot import it."""
    root = tmp_path / "images"
    write_folders(root)
    bad = root / "unlabeled" / "batch0" / "x" / "u0.JPG"
    bad.write_bytes(bad.read_bytes()[:100])
    workdir = tmp_path / "pipe"
    args = [f"--workdir={workdir}", "--finetune.examples_per_class=2"]
    args += [f"--pretrain.{k}={v}" for k, v in TINY_MODEL.items()]
    args += [f"--pretrain.data_dir={root}", "--pretrain.dataset=image_folder", "--pretrain.eval_split=test"]
    # The k-NN monitor on folders is compiled once, in the run without TensorFlow.
    args += [f"--pretrain.knn_monitor={not tensorflow}"]
    for stage in ("pretrain", "finetune", "distill", "baseline"):
        args += [
            f"--{stage}.train_steps=2",
            f"--{stage}.train_batch_size=8",
            f"--{stage}.eval_batch_size=8",
            f"--{stage}.skip_bad_images=True",
        ]
    block = "import sys; sys.modules['tensorflow'] = None; sys.modules['tensorflow_datasets'] = None; "
    code = (block if not tensorflow else "import sys; ") + (
        "import runpy; sys.argv = ['run_all'] + sys.argv[1:]; "
        "runpy.run_module('simclrv2_jax.run_all', run_name='__main__', alter_sys=True)"
    )
    env = subprocess_env(jax_compile_cache)
    proc = subprocess.run(
        [sys.executable, "-c", code, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((workdir / "summary.json").read_text())
    pretrain = summary["stages"]["pretrain"]
    assert pretrain["num_train_examples"] == 12 + 5 and pretrain["class_names"] == list(CLASSES)
    assert pretrain["skipped_bad_images"] == 1 and pretrain["augment_on_device"] is not tensorflow
    assert summary["stages"]["finetune"]["num_labeled_examples"] == 6
    for stage in ("finetune", "distill", "baseline"):
        assert 0.0 <= summary["stages"][stage]["eval"]["top1"] <= 1.0
    run = json.loads((workdir / "finetune" / "run.json").read_text())
    assert run["class_names"] == list(CLASSES)
    code = (block if not tensorflow else "import sys; ") + (
        "import runpy; sys.argv = ['evaluate'] + sys.argv[1:]; "
        "runpy.run_module('simclrv2_jax.evaluate', run_name='__main__', alter_sys=True)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, f"--workdir={workdir / 'finetune'}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(12 examples of image_folder/test)" in proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("on_device", [True, False])
def test_fashion_mnist_as_png_folders_evaluates_as_the_idx_files(tmp_path, pretrain_run, on_device):
    """Lossless: the test split written as PNG class folders (named so they sort in label order) gives
    the pretrained linear head the same top-1 as the IDX files it was read from."""
    from simclrv2_jax.evaluation import evaluator

    data_dir = Path(pretrain_run["config"].data_dir)
    root = tmp_path / "png"
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = read_idx_gz(data_dir / f"{prefix}-images-idx3-ubyte.gz")
        labels = read_idx_gz(data_dir / f"{prefix}-labels-idx1-ubyte.gz")
        for i, (image, label) in enumerate(zip(images, labels)):
            folder = root / split / f"class{label:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"{i:05d}.png")
    idx = evaluator.evaluate_run(str(pretrain_run["workdir"]), output_dir=str(tmp_path / "idx"))[0]
    overrides = dict(
        dataset="image_folder", data_dir=str(root), eval_split="test", augment_on_device=on_device
    )
    png = evaluator.evaluate_run(
        str(pretrain_run["workdir"]), overrides=overrides, output_dir=str(tmp_path / "o")
    )
    assert png[0]["num_examples"] == idx["num_examples"] == 40
    assert png[0]["top1"] == idx["top1"] and png[0]["top5"] == idx["top5"]
    # The tiny model takes 16 px: on the device path the folder's images are resized on the host
    # (Pillow), the IDX images in the step (TF's bicubic), which moves the loss by rounding only.
    np.testing.assert_allclose(png[0]["loss"], idx["loss"], rtol=1e-5 if not on_device else 1e-3)


@pytest.mark.slow
def test_a_run_stopped_by_a_bad_file_keeps_its_checkpoint_and_resumes_with_it_skipped(tmp_path):
    from simclrv2_jax.train import train_stage

    root = tmp_path / "images"
    write_folders(root)
    config = folder_config("pretrain", "fashion_mnist", root, checkpoint_steps=1)
    config.train_steps = 4
    config.lineareval_while_pretraining = False
    paths = sorted(str(p) for p in (root / "unlabeled").rglob("*.JPG"))
    for path in paths:  # every unlabeled image bad: the first step that meets one stops
        Path(path).write_bytes(b"junk")
    with pytest.raises(BadImageError, match="does not decode"):
        train_stage(config, str(tmp_path / "run"))
    config.skip_bad_images = True
    results = train_stage(config, str(tmp_path / "run"))
    assert results["completed"] and results["skipped_bad_images"] == len(paths)
