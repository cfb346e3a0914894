"""``data.decode: device`` on the CPU: workers send JPEG bytes and crop boxes, the main process decodes
them in a batch (the GPU path with ``device="cpu"``); same crops as the workers' own decoding within
JPEG-decoder tolerance, and the files the device does not take are decoded in the workers as before."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image
from host_syncs import HostSyncCounter
from torch.utils.data import DataLoader

from mtssl_lightning.data import ImageBatch, MultiTaskDataModule
from mtssl_lightning.data import device_decode
from mtssl_lightning.data.datasets import CropDataset
from mtssl_lightning.data.device_decode import EncodedCropDataset, EncodedImageBatch, decode_batch, device_decodable
from mtssl_lightning.data.loading import Positions
from mtssl_lightning.data.sample import load_sample_image
from mtssl_lightning.data.sources import ImageFolder

#: device path (torchvision's libjpeg-turbo decode + Pillow's bilinear weights as matrix products) vs
#: worker path (Pillow's libjpeg-turbo decode + ``Image.resize(BILINEAR, box=…)``) on the same crops,
#: in grey levels of uint8: measured max 1 and mean <= 0.004 (<= 0.4 % of the values differ, by 1)
#: over fixed and random crops of 32-600 px: the decoders agree; float vs Pillow's fixed-point sums round apart
MAX_ABS_DIFF, MEAN_ABS_DIFF = 1, 0.01


def _photo(name: str, width: int, height: int) -> Image.Image:
    return Image.fromarray(load_sample_image(name)).resize((width, height), Image.BICUBIC)


def write_folder(root):
    """Baseline RGB JPEGs of several sizes, plus one of each kind the device path leaves to the workers."""
    sizes = {"astronaut": (500, 375), "chelsea": (451, 300), "rocket": (300, 450), "coffee": (640, 427), "retina": (256, 256), "hubble_deep_field": (180, 120)}
    for name, (w, h) in sizes.items():
        _photo(name, w, h).save(root / f"{name}.jpg", quality=90)
    odd = _photo("astronaut", 320, 240)
    odd.save(root / "z_png.png")
    odd.save(root / "z_webp.webp", quality=90)
    odd.convert("CMYK").save(root / "z_cmyk.jpg", quality=90)
    odd.convert("L").save(root / "z_grey.jpg", quality=90)
    odd.save(root / "z_progressive.jpg", quality=90, progressive=True)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to view
    odd.save(root / "z_rotated.jpg", quality=90, exif=exif)
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("images"))


FALLBACK = ("z_png.png", "z_webp.webp", "z_cmyk.jpg", "z_grey.jpg", "z_progressive.jpg", "z_rotated.jpg")


def test_which_files_the_device_decodes(folder):
    for name in FALLBACK:
        assert device_decodable(folder / name) is None, name
    assert device_decodable(folder / "astronaut.jpg") == (500, 375)
    with pytest.raises(Exception):
        (folder / "broken.jpg").write_bytes(b"not an image")
        device_decodable(folder / "broken.jpg")
    (folder / "broken.jpg").unlink()


def _both(folder, train: bool, length: int, size: int = 96, seed: int = 0) -> tuple[ImageBatch, ImageBatch, EncodedImageBatch]:
    source = ImageFolder(folder)
    # the device decodes whole JPEGs: compared with the workers' full decode (no DCT scaling)
    cpu = CropDataset(source, size, length, train=train, reduce=False)
    dev = EncodedCropDataset(source, size, length, train=train, reduce=False)
    torch.manual_seed(seed)
    worker = cpu.collate([cpu[i] for i in range(length)])
    torch.manual_seed(seed)
    encoded = dev.collate([dev[i] for i in range(length)])
    return worker, decode_batch(encoded), encoded


@pytest.mark.parametrize("train", [False, True], ids=["fixed-crops", "random-crops-and-flips"])
def test_device_path_gives_the_workers_crops_within_decoder_tolerance(folder, train):
    """Two passes over all 12 files (8 encoded for the device, the rest decoded by the worker): the
    crops agree within MAX_ABS_DIFF / MEAN_ABS_DIFF grey levels; the worker-decoded ones exactly."""
    worker, device, encoded = _both(folder, train, length=24)
    names = ImageFolder(folder).names
    assert torch.equal(worker.index, device.index)
    on_device = [k for k in range(24) if names[int(device.index[k])].endswith(".jpg") and not names[int(device.index[k])].startswith("z_")]
    assert encoded.encoded == on_device and len(on_device) == 12
    diff = (worker.images.int() - device.images.int()).abs()
    assert int(diff.max()) <= MAX_ABS_DIFF and float(diff.float().mean()) <= MEAN_ABS_DIFF, (int(diff.max()), float(diff.float().mean()))
    fallback = [k for k in range(24) if k not in on_device]
    assert torch.equal(worker.images[fallback], device.images[fallback])  # PNG, WebP, CMYK, grey, progressive, rotated


def test_a_datamodule_with_decode_device_feeds_the_tasks_and_counts_a_corrupt_jpeg(folder, tmp_path, monkeypatch):
    """Through the DataModule (two workers, then the batch on the 'device' = CPU): complete task
    batches; a JPEG whose header is fine but whose data is not is replaced in the batch, warned about
    and counted in ``skipped``."""
    from mtssl_lightning.tasks import ColorizationSampler, RelativePositionSampler

    samplers = {"rp": RelativePositionSampler(batch_size=4, patch_size=16, gap=4, jitter=2), "col": ColorizationSampler(batch_size=4, image_size=48)}
    dm = MultiTaskDataModule(image_root=str(folder), val_fraction=0.2, steps_per_epoch=2, num_workers=2, samplers=samplers, decode="device")
    dm.setup("fit")
    raw, _, _ = next(iter(dm.train_dataloader()))
    assert isinstance(raw["rp"], EncodedImageBatch) and isinstance(raw["col"], EncodedImageBatch)
    batches = dm.on_after_batch_transfer(raw, 0)
    assert batches["rp"].inputs.shape[1:] == (3, 16, 16) and batches["col"].inputs.shape == (4, 3, 48, 48)
    assert batches["rp"].samples == batches["col"].samples == 4

    good = Image.open(folder / "astronaut.jpg")
    data = io.BytesIO()
    good.save(data, "JPEG", quality=90)
    bytes_ = bytearray(data.getvalue())
    bytes_[len(bytes_) // 2 :] = b"\x00" * (len(bytes_) - len(bytes_) // 2 - 2) + b"\xff\xd9"  # header intact, scan data gone
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "bad.jpg").write_bytes(bytes(bytes_))
    good.save(corrupt / "good.jpg", quality=90)
    dataset = EncodedCropDataset(ImageFolder(corrupt, ["bad.jpg", "good.jpg"]), 32, 2, train=False)
    batch = dataset.collate([dataset[0], dataset[1]])
    assert batch.encoded == [0, 1]
    assert decode_batch(batch).images.shape == (2, 3, 32, 32)  # libjpeg-turbo decodes it (grey blocks, a warning on stderr)

    # a decoder that rejects the file (nvJPEG may): replaced by the other image, warned about, counted
    real = device_decode._decode_jpegs
    monkeypatch.setattr(device_decode, "_decode_jpegs", lambda files, device: [None, *real(files[1:], device)])
    with pytest.warns(UserWarning, match="bad.jpg"):
        decoded = decode_batch(batch)
    assert decoded.skipped == 1 and torch.equal(decoded.images[0], decoded.images[1])


def test_decoding_a_batch_makes_the_host_wait_for_nothing(folder):
    """No op of the device path's crop and resize would make the host wait for a GPU (counted on the CPU;
    nvJPEG's own synchronisation inside ``decode_jpeg`` is measured by ``make gpu-check``)."""
    dataset = EncodedCropDataset(ImageFolder(folder), 64, 12, train=True)
    batch = dataset.collate([dataset[i] for i in range(12)])
    with HostSyncCounter() as counter:
        decode_batch(batch)
    assert counter.ops > 100 and counter.total == 0, dict(counter.counts)


def test_pinned_batches_keep_the_bytes_on_the_host(folder, monkeypatch):
    """Lightning's transfer moves every tensor it finds; the encoded bytes must stay on the host
    (``decode_jpeg`` reads them there), while ``pin_memory`` pins them as one buffer."""
    from lightning.fabric.utilities.apply_func import move_data_to_device

    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *a, **k: pinned.append(self.numel()) or self.clone())
    dataset = Positions(EncodedCropDataset(ImageFolder(folder), 32, 6, train=False))
    batch = next(iter(DataLoader(dataset, batch_size=6, collate_fn=dataset.collate)))
    flat = batch.data.flat
    out = batch.pin_memory()
    assert batch.position == 0 and len(pinned) == 3  # images, index, and the bytes as one buffer
    moved = move_data_to_device(out, torch.device("cpu"))
    assert moved.data is out.data  # not copied, not moved
    assert torch.equal(moved.data.flat, flat)


def test_decode_must_be_cpu_or_device():
    with pytest.raises(ValueError, match="decode"):
        MultiTaskDataModule(decode="gpu")
