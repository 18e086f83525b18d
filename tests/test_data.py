"""Dataset loaders on tiny files written in the real formats, and the invariants of batching and augmentation."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fisherkd.data import (
    ArrayDataset,
    AugmentConfig,
    DataSplits,
    DeviceLoader,
    FolderLoader,
    FolderSplits,
    augment,
    available_datasets,
    load_dataset,
    load_glue,
    make_loader,
    normalize_images,
    tokenize_glue,
)
from fisherkd.data.augment import mixup, random_crop, random_flip
from fisherkd.data.cifar import LAYOUTS
from fisherkd.data.fashion_mnist import MEAN as FASHION_MEAN
from fisherkd.data.fashion_mnist import STD as FASHION_STD
from fisherkd.data.folder import IMAGENET_MEAN, IMAGENET_STD, _random_resized_box

# ---------------------------------------------------------------------------------------------------------- helpers


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    """IDX: big-endian magic, one big-endian int32 per dimension, then the unsigned bytes."""
    payload = struct.pack(f">i{array.ndim}i", magic, *array.shape) + array.astype(np.uint8).tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def write_fashion(root: Path, gz: bool, n_train: int = 6, n_test: int = 4) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test),
    }
    root.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        write_idx(root / (name + (".gz" if gz else "")), array, 2051 if "images" in name else 2049)
    return arrays


def write_cifar(root: Path, name: str, n: int = 3) -> dict[str, tuple[np.ndarray, list[int]]]:
    """Pickles with the real keys; images as N×3×32×32, stored as the real N×3072 rows of R, G, B planes."""
    layout = LAYOUTS[name]
    folder = root / layout.folder
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    written = {}
    for file in (*layout.train_files, layout.test_file):
        images = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
        labels = rng.integers(0, layout.num_classes, n).tolist()
        batch = {b"data": images.reshape(n, 3072), layout.label_key: labels, b"filenames": [b"x.png"] * n}
        if name == "cifar100":
            batch[b"coarse_labels"] = [0] * n
        (folder / file).write_bytes(pickle.dumps(batch, protocol=2))
        written[file] = (images, labels)
    return written


# ------------------------------------------------------------------------------------------------------ fashion


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_reads_idx(tmp_path: Path, gz: bool) -> None:
    arrays = write_fashion(tmp_path, gz)
    splits = load_dataset("fashion_mnist", root=tmp_path)
    assert isinstance(splits, DataSplits)
    assert splits.train.x.shape == (6, 1, 28, 28) and splits.test.x.shape == (4, 1, 28, 28)
    assert splits.train.x.dtype == torch.float32 and splits.train.y.dtype == torch.int64
    assert splits.num_classes == 10 and splits.input_shape == (1, 28, 28) and splits.in_channels == 1
    assert splits.test.y.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    pixels = torch.from_numpy(arrays["train-images-idx3-ubyte"]).float()[:, None]
    expected = (pixels / 255 - FASHION_MEAN[0]) / FASHION_STD[0]
    torch.testing.assert_close(splits.train.x, expected)


def test_fashion_mnist_missing_dir_says_how_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as error:
        load_dataset("fashion_mnist", root=tmp_path / "nowhere")
    message = one_line(error)
    assert "nowhere" in message and "apt-get install dataset-fashion-mnist" in message and "root=" in message


def test_fashion_mnist_missing_file(tmp_path: Path) -> None:
    write_fashion(tmp_path, gz=True)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        load_dataset("fashion_mnist", root=tmp_path)


@pytest.mark.parametrize(
    ("corrupt", "match"),
    [
        (lambda p: p.write_bytes(struct.pack(">iiii", 2049, 6, 28, 28) + bytes(6 * 784)), "magic number 2049"),
        (lambda p: p.write_bytes(p.read_bytes()[:-5]), "holds"),
        (lambda p: p.write_bytes(b"\x00\x00"), "magic"),
    ],
    ids=["wrong-magic", "truncated", "too-short"],
)
def test_fashion_mnist_corrupt_file_named(tmp_path: Path, corrupt, match: str) -> None:
    write_fashion(tmp_path, gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    corrupt(path)
    with pytest.raises(ValueError, match=match) as error:
        load_dataset("fashion_mnist", root=tmp_path)
    assert str(path) in one_line(error)


def test_fashion_mnist_bad_gzip_named(tmp_path: Path) -> None:
    write_fashion(tmp_path, gz=True)
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:20])  # truncated gzip stream
    with pytest.raises(ValueError, match="corrupt IDX file") as error:
        load_dataset("fashion_mnist", root=tmp_path)
    assert str(path) in one_line(error)


# -------------------------------------------------------------------------------------------------------- cifar


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
@pytest.mark.parametrize("point_at_folder", [False, True])
def test_cifar_reads_pickles(tmp_path: Path, name: str, point_at_folder: bool) -> None:
    written = write_cifar(tmp_path, name)
    layout = LAYOUTS[name]
    splits = load_dataset(name, root=tmp_path / layout.folder if point_at_folder else tmp_path)
    n_train = 3 * len(layout.train_files)
    assert splits.train.x.shape == (n_train, 3, 32, 32) and splits.test.x.shape == (3, 3, 32, 32)
    assert splits.train.x.dtype == torch.float32 and splits.test.y.dtype == torch.int64
    assert splits.num_classes == layout.num_classes and splits.input_shape == (3, 32, 32)
    train_labels = [label for file in layout.train_files for label in written[file][1]]
    assert splits.train.y.tolist() == train_labels
    images, labels = written[layout.test_file]
    assert splits.test.y.tolist() == labels
    # The row layout (R plane, G plane, B plane) must come back as channels, each normalised by its own stats.
    torch.testing.assert_close(splits.test.x, normalize_images(images, layout.mean, layout.std))
    red = (torch.from_numpy(images[:, 0]).float() / 255 - layout.mean[0]) / layout.std[0]
    torch.testing.assert_close(splits.test.x[:, 0], red)


def test_cifar_missing_says_where_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as error:
        load_dataset("cifar10", root=tmp_path)
    message = one_line(error)
    assert "cifar-10-batches-py" in message and "cifar-10-python.tar.gz" in message and "root=" in message


def test_cifar_corrupt_or_hostile_pickles_rejected(tmp_path: Path) -> None:
    write_cifar(tmp_path, "cifar100")
    test_file = tmp_path / "cifar-100-python" / "test"
    test_file.write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(ValueError, match="corrupt CIFAR batch file.*fine_labels"):
        load_dataset("cifar100", root=tmp_path)
    test_file.write_bytes(pickle.dumps(os.getcwd))  # a pickle that names a callable outside numpy
    with pytest.raises(ValueError, match="refusing to load"):
        load_dataset("cifar100", root=tmp_path)


# ---------------------------------------------------------------------------------------------------------- npz


def test_npz_with_test_arrays(tmp_path: Path) -> None:
    path = tmp_path / "mine.npz"
    x, y = np.ones((5, 2, 3), np.float64), np.array([0, 1, 2, 1, 0])
    np.savez(path, x=x, y=y, x_test=np.zeros((2, 2, 3)), y_test=[4, 0])
    splits = load_dataset("npz", root=path)
    assert splits.train.x.shape == (5, 2, 3) and splits.test.x.shape == (2, 2, 3)
    assert splits.train.x.dtype == torch.float32 and splits.train.y.dtype == torch.int64
    assert splits.num_classes == 5 and splits.input_shape == (2, 3)


def test_npz_split_is_deterministic_and_complete(tmp_path: Path) -> None:
    path = tmp_path / "mine.npz"
    np.savez(path, x=np.arange(20, dtype=np.float32)[:, None], y=np.arange(20) % 3)
    first, again, other = (load_dataset("npz", root=path, seed=s) for s in (0, 0, 1))
    assert len(first.train) == 16 and len(first.test) == 4
    assert torch.equal(first.test.x, again.test.x) and not torch.equal(first.test.x, other.test.x)
    values = sorted(torch.cat([first.train.x, first.test.x]).flatten().tolist())
    assert values == list(range(20))
    assert torch.equal(first.train.y, first.train.x.flatten().long() % 3)  # labels stay with their inputs
    assert first.num_classes == 3 and first.input_shape == (1,)


def test_npz_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="npz dataset file"):
        load_dataset("npz", root=tmp_path / "absent.npz")
    path = tmp_path / "bad.npz"
    np.savez(path, x=np.zeros((3, 2)), labels=np.zeros(3))
    with pytest.raises(ValueError, match="no array 'y'"):
        load_dataset("npz", root=path)


# ------------------------------------------------------------------------------------------------ image folders


def write_image_folder(root: Path) -> None:
    """2 classes; training images of assorted sizes and modes, validation images of one flat colour."""
    rng = np.random.default_rng(2)
    for split, count in (("train", 3), ("val", 2)):
        for label, name in enumerate(("cat", "dog")):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                if split == "train":
                    size = (20 + 4 * i, 12 + 2 * i)
                    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                    image = Image.fromarray(pixels).convert("L" if i == 2 else "RGB")
                else:
                    image = Image.new("RGB", (16, 10), (200 * label, 100, 50))
                image.save(root / split / name / f"{i}.png")
    (root / "train" / "cat" / "notes.txt").write_text("not an image")


@pytest.fixture
def folder(tmp_path: Path) -> FolderSplits:
    write_image_folder(tmp_path / "tiny")
    splits = load_dataset("image_folder", root=tmp_path / "tiny", image_size=8)
    assert isinstance(splits, FolderSplits)
    return splits


def test_image_folder_splits(folder: FolderSplits) -> None:
    assert folder.classes == ["cat", "dog"] and folder.num_classes == 2
    assert folder.input_shape == (3, 8, 8) and folder.in_channels == 3
    assert len(folder.train) == 6 and len(folder.test) == 4
    assert folder.train.targets == [0, 0, 0, 1, 1, 1]
    pixels, label, index = folder.train[(4, "seed")]
    assert pixels.shape == (3, 8, 8) and pixels.dtype == torch.uint8 and (label, index) == (1, 4)


def test_image_folder_eval_batches_are_normalised(folder: FolderSplits) -> None:
    loader = make_loader(folder, "test", batch_size=4, shuffle=False, drop_last=False, num_workers=0)
    assert isinstance(loader, FolderLoader) and len(loader) == 1
    (batch,) = loader.epoch(0)
    assert batch.x.shape == (4, 3, 8, 8) and batch.x.dtype == torch.float32
    assert batch.y.tolist() == [0, 0, 1, 1] and batch.index.tolist() == [0, 1, 2, 3]
    for x, label in zip(batch.x, batch.y.tolist()):
        colour = torch.tensor([200.0 * label, 100, 50]) / 255
        expected = (colour - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
        torch.testing.assert_close(x, expected[:, None, None].expand(3, 8, 8), atol=1e-5, rtol=0)


def test_image_folder_center_crop(tmp_path: Path) -> None:
    """Resize the shorter side to resize_size, then keep the centred square: here exactly the white middle."""
    for split in ("train", "val"):
        (tmp_path / split / "only").mkdir(parents=True)
    pixels = np.zeros((8, 24, 3), np.uint8)
    pixels[:, 6:18] = 255  # the crop is columns 8–15; bilinear downscaling also reads a pixel or two beyond it
    Image.fromarray(pixels).save(tmp_path / "val" / "only" / "a.png")
    Image.fromarray(pixels).save(tmp_path / "train" / "only" / "a.png")
    splits = load_dataset("image_folder", root=tmp_path, image_size=4, resize_size=4)
    image, _, _ = splits.test[0]
    assert image.shape == (3, 4, 4) and bool((image == 255).all())


def test_folder_loader_order_and_augmentation_depend_only_on_seed_and_epoch(folder: FolderSplits) -> None:
    def batches(loader: FolderLoader, epoch: int, start: int = 0) -> list[tuple[torch.Tensor, list[int]]]:
        return [(b.x, b.index.tolist()) for b in loader.epoch(epoch, start)]

    loader = folder.loader("train", batch_size=2, seed=3, num_workers=0)
    assert len(loader) == 3
    first = batches(loader, 1)
    torch.manual_seed(123)  # global RNG state must not matter
    again = batches(folder.loader("train", batch_size=2, seed=3, num_workers=0), 1)
    assert all(torch.equal(a[0], b[0]) and a[1] == b[1] for a, b in zip(first, again))
    assert sorted(i for _, index in first for i in index) == list(range(6))
    tail = batches(loader, 1, start=1)
    assert all(torch.equal(a[0], b[0]) and a[1] == b[1] for a, b in zip(first[1:], tail)) and len(tail) == 2
    assert [index for _, index in batches(loader, 2)] != [index for _, index in first]


def test_folder_loader_workers_match_main_process_and_resume(folder: FolderSplits) -> None:
    """Persistent workers give the same batches as no workers, also after an epoch abandoned half-way."""
    reference = [b.x for b in folder.loader("train", batch_size=2, seed=5, num_workers=0).epoch(0)]
    loader = folder.loader("train", batch_size=2, seed=5, num_workers=1)
    abandoned = loader.epoch(0)
    torch.testing.assert_close(next(abandoned).x, reference[0])
    resumed = [b.x for b in loader.epoch(0, start=1)]
    assert len(resumed) == 2 and all(torch.equal(a, b) for a, b in zip(resumed, reference[1:]))


def test_folder_loader_ranks_take_their_slice_of_each_global_batch(folder: FolderSplits) -> None:
    """Under DDP each rank decodes its share of the global batch, with the crops and flips one process would draw."""
    whole = list(make_loader(folder, "train", 4, seed=3, num_workers=0).epoch(1))
    ranks = [list(make_loader(folder, "train", 4, seed=3, num_workers=0, rank=r, world_size=2).epoch(1))
             for r in range(2)]
    assert len(whole) == len(ranks[0]) == len(ranks[1]) == 1  # 6 images, global batch 4, the rest dropped
    for batch, first, second in zip(whole, *ranks):
        assert first.index.tolist() == batch.index[0::2].tolist()
        assert second.index.tolist() == batch.index[1::2].tolist()
        assert torch.equal(first.x, batch.x[0::2]) and torch.equal(second.x, batch.x[1::2])


def test_random_resized_box_stays_inside_with_valid_shape() -> None:
    import random

    rng = random.Random(0)
    for width, height in ((50, 30), (30, 50), (7, 7), (100, 2)):
        for _ in range(50):
            left, top, right, bottom = _random_resized_box(width, height, rng, (0.08, 1.0), (3 / 4, 4 / 3))
            assert 0 <= left < right <= width and 0 <= top < bottom <= height


def test_image_folder_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as error:
        load_dataset("image_folder", root=tmp_path / "imagenet")
    assert "imagenet" in one_line(error) and "train/<class>" in one_line(error)
    (tmp_path / "imagenet" / "train" / "a").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="validation split folder"):
        load_dataset("image_folder", root=tmp_path / "imagenet")


# ---------------------------------------------------------------------------------------------------- registry


def test_registry_names_and_make_loader_for_arrays() -> None:
    assert {"mnist1d", "fashion_mnist", "cifar10", "cifar100", "npz", "image_folder"} <= set(available_datasets())
    with pytest.raises(KeyError, match="cifar10"):
        load_dataset("cifar-10")
    data = ArrayDataset(torch.randn(10, 2), torch.arange(10))
    splits = DataSplits("toy", data, data, num_classes=10, input_shape=(2,))
    loader = make_loader(splits, "test", batch_size=4, shuffle=False, drop_last=False)
    assert isinstance(loader, DeviceLoader) and len(loader) == 3


def test_mnist1d_default_split() -> None:
    splits = load_dataset("mnist1d")
    assert splits.train.x.shape == (4000, 40) and splits.test.x.shape == (1000, 40)
    assert splits.train.x.dtype == torch.float32 and splits.train.y.dtype == torch.int64
    assert splits.num_classes == 10 and set(splits.train.y.tolist()) == set(range(10))


# -------------------------------------------------------------------------------------------------------- GLUE

GLUE_FILES = {
    "SST-2": ("sentence\tlabel", ['a "quoted" film\t1', "dull\t0"]),
    "MRPC": ("Quality\t#1 ID\t#2 ID\t#1 String\t#2 String", ["1\t11\t12\tHe said .\tHe stated .", "0\t3\t4\tA\tB"]),
    "RTE": ("index\tsentence1\tsentence2\tlabel", ["0\tP one\tH one\tnot_entailment", "1\tP two\tH two\tentailment"]),
    "QNLI": ("index\tquestion\tsentence\tlabel", ["0\tWhy?\tBecause.\tentailment", "1\tWho?\tNo one.\tnot_entailment"]),
    "STS-B": (
        "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore",
        ["0\tmain\tf\t2012\t1\tnone\tnone\tA man.\tA person.\t4.2", "1\tmain\tf\t2012\t2\tnone\tnone\tX\tY\t0.0"],
    ),
}
MNLI_HEADER = (
    "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t"
    "sentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label"
)
MNLI_ROWS = ["0\t1\t1n\tfiction\t( x )\t( y )\t(ROOT x)\t(ROOT y)\tPremise .\tHypothesis .\tneutral\tneutral"]


def write_glue(root: Path, task: str, header: str, rows: list[str], dev_file: str = "dev.tsv") -> Path:
    folder = root / task
    folder.mkdir(parents=True)
    for file in ("train.tsv", dev_file):
        (folder / file).write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return folder


@pytest.mark.parametrize("task", list(GLUE_FILES))
def test_glue_tasks(tmp_path: Path, task: str) -> None:
    header, rows = GLUE_FILES[task]
    splits = load_glue(write_glue(tmp_path, task, header, rows))
    assert len(splits.train) == len(splits.dev) == 2
    expected = {
        "SST-2": (['a "quoted" film', "dull"], None, [1, 0], 2),
        "MRPC": (["He said .", "A"], ["He stated .", "B"], [1, 0], 2),
        "RTE": (["P one", "P two"], ["H one", "H two"], [1, 0], 2),
        "QNLI": (["Why?", "Who?"], ["Because.", "No one."], [0, 1], 2),
        "STS-B": (["A man.", "X"], ["A person.", "Y"], [4.2, 0.0], 1),
    }[task]
    assert (splits.dev.text_a, splits.dev.text_b, splits.dev.labels, splits.num_labels) == expected


def test_glue_mnli_uses_dev_matched(tmp_path: Path) -> None:
    splits = load_glue(write_glue(tmp_path, "MNLI", MNLI_HEADER, MNLI_ROWS, dev_file="dev_matched.tsv"))
    assert splits.task == "mnli" and splits.num_labels == 3
    assert (splits.dev.text_a, splits.dev.text_b, splits.dev.labels) == (["Premise ."], ["Hypothesis ."], [2])


def test_glue_cola_has_no_header(tmp_path: Path) -> None:
    folder = tmp_path / "CoLA"
    folder.mkdir()
    for file in ("train.tsv", "dev.tsv"):
        (folder / file).write_text("gj04\t1\t\tOur friends won't buy it.\ngj04\t0\t*\tThey drank the pub.\n")
    splits = load_glue(folder)
    assert splits.dev.text_a == ["Our friends won't buy it.", "They drank the pub."] and splits.dev.text_b is None
    assert splits.dev.labels == [1, 0] and splits.task == "cola"


def test_glue_errors(tmp_path: Path) -> None:
    folder = write_glue(tmp_path, "SST-2", "sentence\tlabel", ["fine\t1", "odd\tpositive"])
    with pytest.raises(ValueError, match=r"train.tsv:3: label 'positive'"):
        load_glue(folder)
    with pytest.raises(ValueError, match="unknown GLUE task"):
        load_glue(folder, task="sst3")
    with pytest.raises(FileNotFoundError, match="GLUE task folder"):
        load_glue(tmp_path / "absent", task="rte")


def test_tokenize_glue_pairs(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "he", "said", "stated", ".", "a", "b"]
    tokenizer = transformers.BertTokenizer(vocab={w: i for i, w in enumerate(words)})
    header, rows = GLUE_FILES["MRPC"]
    splits = load_glue(write_glue(tmp_path, "MRPC", header, rows))
    batch = tokenize_glue(splits.train, tokenizer, max_length=10)
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert batch["input_ids"].shape == (2, 10) and batch["labels"].tolist() == [1, 0]
    assert batch["labels"].dtype == torch.int64
    assert batch["input_ids"][0].tolist() == [2, 5, 6, 8, 3, 5, 7, 8, 3, 0]  # [CLS] a [SEP] b [SEP] [PAD]
    assert batch["token_type_ids"][1].tolist() == [0, 0, 0, 1, 1, 0, 0, 0, 0, 0]
    assert batch["attention_mask"][1].tolist() == [1, 1, 1, 1, 1, 0, 0, 0, 0, 0]
    truncated = tokenize_glue(splits.train, tokenizer, max_length=6)["input_ids"]
    assert truncated.shape == (2, 6) and truncated[0, -1].item() == 3  # still ends with [SEP]
    header, rows = GLUE_FILES["STS-B"]
    scores = tokenize_glue(load_glue(write_glue(tmp_path, "STS-B", header, rows)).dev, tokenizer, max_length=8)
    assert scores["labels"].dtype == torch.float32


# --------------------------------------------------------------------------------------------- core batching


def test_device_loader_covers_every_index_once() -> None:
    data = ArrayDataset(torch.arange(10.0)[:, None], torch.arange(10))
    loader = DeviceLoader(data, batch_size=3, shuffle=True, drop_last=False, seed=0)
    batches = list(loader.epoch(0))
    assert len(loader) == len(batches) == 4 and [len(b.index) for b in batches] == [3, 3, 3, 1]
    assert sorted(torch.cat([b.index for b in batches]).tolist()) == list(range(10))
    for b in batches:
        assert torch.equal(b.y, b.index) and torch.equal(b.x[:, 0].long(), b.index)


def test_device_loader_order_depends_only_on_seed_and_epoch() -> None:
    data = ArrayDataset(torch.randn(50, 2), torch.arange(50))

    def order(seed: int, epoch: int) -> list[int]:
        loader = DeviceLoader(data, batch_size=7, seed=seed)
        return torch.cat([b.index for b in loader.epoch(epoch)]).tolist()

    reference = order(seed=1, epoch=3)
    torch.manual_seed(99)
    order(seed=1, epoch=0)  # other epochs and global RNG state in between change nothing
    assert order(seed=1, epoch=3) == reference
    assert order(seed=1, epoch=4) != reference and order(seed=2, epoch=3) != reference


@pytest.mark.parametrize("drop_last", [True, False])
def test_device_loader_start_yields_the_tail(drop_last: bool) -> None:
    data = ArrayDataset(torch.randn(23, 2), torch.arange(23))
    loader = DeviceLoader(data, batch_size=5, drop_last=drop_last, seed=4)
    full = [b.index.tolist() for b in loader.epoch(2)]
    for k in range(len(full) + 1):
        assert [b.index.tolist() for b in loader.epoch(2, start=k)] == full[k:]


# ----------------------------------------------------------------------------------------------- augmentation


@pytest.mark.parametrize("shape", [(16, 3, 5, 6), (16, 12), (16, 2, 12)])
def test_random_crop_outputs_are_windows_of_the_padded_input(shape: tuple[int, ...]) -> None:
    padding = 2
    torch.manual_seed(0)
    x = torch.randn(shape)
    out = random_crop(x, padding)
    assert out.shape == x.shape
    offsets = set()
    if x.dim() == 4:
        padded = torch.nn.functional.pad(x, (padding,) * 4)
        height, width = x.shape[-2:]
        for i in range(len(x)):  # naive: pad, then try every window; all channels must share it
            hits = [
                (t, l)
                for t in range(2 * padding + 1)
                for l in range(2 * padding + 1)
                if torch.equal(out[i], padded[i, :, t : t + height, l : l + width])
            ]
            assert len(hits) == 1, f"sample {i} is not one window of its padded input"
            offsets.add(hits[0])
    else:
        padded = torch.nn.functional.pad(x, (padding, padding))
        length = x.shape[-1]
        for i in range(len(x)):
            hits = [s for s in range(2 * padding + 1) if torch.equal(out[i], padded[i, ..., s : s + length])]
            assert len(hits) == 1, f"sample {i} is not one window of its padded input"
            offsets.add(hits[0])
    assert len(offsets) > 1  # offsets differ between samples


def test_random_flip_flips_whole_chosen_samples() -> None:
    torch.manual_seed(0)
    x = torch.randn(64, 3, 4, 5)
    out = random_flip(x)
    flipped = [torch.equal(o, s.flip(-1)) for o, s in zip(out, x)]
    kept = [torch.equal(o, s) for o, s in zip(out, x)]
    assert all(f != k for f, k in zip(flipped, kept))  # each sample exactly one of the two, all channels alike
    assert 10 < sum(flipped) < 54


def test_mixup_label_is_the_larger_parts() -> None:
    torch.manual_seed(0)
    n = 32
    x, y = torch.eye(n), torch.arange(n) + 100  # one-hot inputs reveal each sample's weight and partner
    mixed, labels = mixup(x, y, alpha=0.4)
    for i in range(n):
        own = mixed[i, i].item()
        partner = i if own == 1 else int(mixed[i].clone().index_fill_(0, torch.tensor([i]), -1).argmax())
        torch.testing.assert_close(mixed[i].sum(), torch.tensor(1.0))
        assert labels[i].item() == (y[i] if own >= 0.5 else y[partner]).item()
    assert (labels != y).any()


def test_augment_all_off_is_identity() -> None:
    x, y = torch.randn(8, 3, 4, 4), torch.arange(8)
    out_x, out_y = augment(x, y, AugmentConfig())
    assert torch.equal(out_x, x) and torch.equal(out_y, y)


def test_train_subset_is_fixed_and_leaves_the_test_split_whole():
    from fisherkd.data import ArrayDataset, DataSplits

    x, y = torch.arange(20.0)[:, None], torch.arange(20) % 4
    splits = DataSplits("toy", ArrayDataset(x, y), ArrayDataset(x[:5], y[:5]), 4, (1,))
    a, b = splits.with_train_subset(8), splits.with_train_subset(8)
    assert torch.equal(a.train.x, b.train.x) and len(a.train) == 8 and len(a.test) == 5
    assert len(set(a.train.x.flatten().tolist())) == 8  # without replacement
    with pytest.raises(ValueError, match="train_subset=30 exceeds the 20"):
        splits.with_train_subset(30)


def test_class_groups_make_a_few_class_task():
    import pytest
    import torch

    from fisherkd.data import ArrayDataset, DataSplits

    x = torch.zeros(6, 2)
    train = ArrayDataset(x, torch.tensor([0, 1, 2, 3, -100, 2]))
    test = ArrayDataset(x[:4], torch.tensor([3, 2, 1, 0]))
    splits = DataSplits("toy", train, test, 4, (2,)).with_class_groups([[0, 2], [1, 3]])
    assert splits.num_classes == 2
    assert splits.train.y.tolist() == [0, 1, 0, 1, -100, 0]
    assert splits.test.y.tolist() == [1, 0, 1, 0]
    base = DataSplits("toy", train, test, 4, (2,))
    with pytest.raises(ValueError, match=r"missing \[3\], repeated \[2\], unknown \[\]"):
        base.with_class_groups([[0, 2], [1, 2]])
    with pytest.raises(ValueError, match=r"unknown \[7\]"):
        base.with_class_groups([[0, 2, 7], [1, 3]])


def test_class_groups_from_the_config_and_the_teacher_key():
    from fisherkd.config import DataConfig
    from fisherkd.data.registry import load_splits
    from fisherkd.run import teacher_data_key

    splits = load_splits(DataConfig(name="mnist1d", class_groups=[[0, 2, 4, 6, 8], [1, 3, 5, 7, 9]]))
    assert splits.num_classes == 2 and set(splits.train.y.tolist()) == {0, 1}
    assert "class_groups" not in teacher_data_key(DataConfig(name="mnist1d"))
    assert teacher_data_key(DataConfig(name="mnist1d", class_groups=[[0], [1, 2, 3, 4, 5, 6, 7, 8, 9]]))[
        "class_groups"
    ] == [[0], [1, 2, 3, 4, 5, 6, 7, 8, 9]]
