"""Images in, labels out: a vision classifier's bundle carries its image processor's steps as data (Pillow and numpy,
no torchvision) and its labels, checked end to end against transformers' own pipeline when it is built."""
import io

import numpy as np
import pytest

from tests._text import resnet_dir, vit_dir
from torchship import OptimizeOptions, load_bundle, optimize
from torchship.errors import SpecError
from torchship.processing.build import sample_images
from torchship.processing.image import ImagePipeline
from torchship.processing.labels import answer
from torchship.processing.records import ImageProcessing, Labels

pytestmark = pytest.mark.slow
ONE = OptimizeOptions(runtimes=("eager",), transforms=(), batch_sizes=(1,), seconds_per_size=0.02)


def _reference(folder, files):
    import torch
    import transformers as tf
    from PIL import Image
    from transformers.image_utils import load_image
    proc = tf.AutoImageProcessor.from_pretrained(folder)
    model = tf.AutoModelForImageClassification.from_pretrained(folder).eval()
    pixels = proc([load_image(Image.open(io.BytesIO(f))) for f in files], return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        logits = model(pixel_values=pixels).logits
    return [model.config.id2label[i] for i in logits.argmax(-1).tolist()], logits.softmax(-1).max(-1).values.numpy()


def test_a_vit_classifier_takes_image_files_and_answers_with_labels(vit_bundle, tmp_path):
    m = load_bundle(vit_bundle)
    p = m.manifest.processing
    assert p.image.size == (32, 32) and p.labels.names == ("cat", "dog", "fox", "owl", "eel")
    c = p.check
    assert c.passed and c.kind == "image" and c.inputs_equal and c.labels_equal and c.min_cosine >= 0.9999
    assert {"PNG grayscale", "PNG RGBA", "JPEG with EXIF orientation 6", "WebP 33x33"} <= set(c.cases)
    files, _ = sample_images()
    folder = vit_dir(tmp_path / "vit")  # the same seed and config: the model the bundle was made from
    labels, scores = _reference(folder, files)
    out = m(files)
    assert out["label"].tolist() == labels
    np.testing.assert_allclose(out["score"], scores, rtol=1e-4)
    top = m(files[:2], top_k=3)
    assert top["label"].shape == (2, 3) and (np.diff(top["score"], axis=1) <= 0).all()
    from PIL import Image
    assert m([Image.open(io.BytesIO(files[0]))])["label"].tolist() == labels[:1]  # a Pillow image as it is


@pytest.mark.parametrize("make, expected", [
    (lambda d: vit_dir(d, processor="clip"), dict(shortest_edge=32, crop=(32, 32), resample=3)),
    (resnet_dir, dict(shortest_edge=224, crop_pct=0.875)),
])
def test_shortest_edge_crops_and_crop_pct_match_transformers(make, expected, tmp_path):
    folder = make(tmp_path / "m")
    m = load_bundle(optimize(folder, ONE, out=tmp_path / "b").bundle)
    image = m.manifest.processing.image
    assert all(getattr(image, k) == v for k, v in expected.items()), image
    c = m.manifest.processing.check
    assert c.passed and c.max_input_error <= 1e-3, c
    files, _ = sample_images()
    assert m(files)["label"].tolist() == _reference(folder, files)[0]


def _png_header(width: int, height: int) -> bytes:
    """A PNG that claims a huge image in a few bytes (a decompression bomb's header)."""
    import struct
    import zlib
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = lambda kind, data: struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))  # noqa: E731
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def test_bad_images_are_refused_with_the_reason():
    pipe = ImagePipeline(ImageProcessing(size=(8, 8), max_pixels=1_000_000))
    with pytest.raises(SpecError, match="item 0 is not an image"):
        pipe.encode([b"definitely not an image"])
    with pytest.raises(SpecError, match="item 1 is over the limit of 1,000,000 pixels"):  # Pillow's own bomb check
        pipe.encode([sample_images()[0][0], _png_header(100_000, 100_000)])
    with pytest.raises(SpecError, match="item 0 is 2000x1000 pixels, over the limit of 1,000,000 pixels"):
        pipe.encode([_png_header(2000, 1000)])  # under Pillow's limit, over ours: refused before decoding
    with pytest.raises(SpecError, match="no image given"):
        pipe.encode([])
    assert pipe.encode(sample_images()[0])["pixel_values"].shape == (9, 3, 8, 8)


def test_labels_are_softmax_scores_best_first():
    labels = Labels(output="logits", names=("a", "b", "c"))
    out = answer(labels, {"logits": np.array([[0.0, 2.0, 1.0], [3.0, 0.0, 0.0]])})
    assert out["label"].tolist() == ["b", "a"]
    np.testing.assert_allclose(out["score"], [np.exp(2) / (1 + np.exp(2) + np.exp(1)), np.exp(3) / (np.exp(3) + 2)], rtol=1e-6)
    top = answer(labels, {"logits": np.array([[0.0, 2.0, 1.0]])}, top_k=5)
    assert top["label"].tolist() == [["b", "c", "a"]] and np.isclose(top["score"].sum(), 1.0)


def test_an_image_processor_given_apart_from_the_source(tmp_path):
    folder = vit_dir(tmp_path / "vit")
    proc = tmp_path / "proc"
    proc.mkdir()
    (folder / "preprocessor_config.json").rename(proc / "preprocessor_config.json")
    plain = optimize(folder, ONE, out=tmp_path / "b0")
    assert load_bundle(plain.bundle).manifest.processing.image is None and plain.chosen.fidelity.raw_cosine is None
    result = optimize(folder, ONE, out=tmp_path / "b", image_processor=proc)
    # every candidate ran the image files through the pipeline in the search, the chosen one within its floor
    assert result.chosen.fidelity.raw_cosine >= result.chosen.fidelity.raw_floor == 0.9999
    m = load_bundle(result.bundle)
    assert m.manifest.processing.check.passed and m(sample_images()[0][:2])["label"].shape == (2,)
    assert m.manifest.processing.labels.names[0] == "cat"  # labels come from the model's own config either way
