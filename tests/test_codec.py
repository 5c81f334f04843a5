"""Lossless compression: bit-exact roundtrips for AR and MAR stacks, coded bits against the
likelihood, and every kind of bad file refused with a clear error."""

from __future__ import annotations

import pytest
import torch

from fractalgen import FractalConfig, FractalGen, load_model
from fractalgen import codec
from fractalgen.checkpoint import SHIPPED_MODEL
from fractalgen.codec import compress, decompress, read_header
from fractalgen.container import VERSION
from fractalgen.errors import CodecError, InputError


def tiny(types: tuple[str, ...] = ("ar", "ar", "ar"), channels: int = 3, class_num: int = 10,
         seed: int = 0) -> FractalGen:
    """An 8x8 stack whose pixel logits are far from uniform (so wrong probabilities show)."""
    cfg = FractalConfig((8, 4, 1), (32, 16, 16), (1, 1, 1), (2, 2, 2), types, channels=channels,
                        class_num=class_num, num_conds=1 if types[0] == "ar" else 5)
    torch.manual_seed(seed)
    model = FractalGen(cfg).eval()
    with torch.no_grad():
        model.pixel.codebook.mul_(8)
        if model.class_emb is not None:
            model.class_emb.weight.mul_(50)  # labels change the likelihood visibly
    return model


def samples(model: FractalGen, n: int = 5, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Images the model finds likely (coded sizes then track the likelihood), and their labels."""
    labels = torch.arange(n) % model.config.class_num if model.config.conditional else None
    images = model.sample(labels=labels, num_images=n, seed=seed)
    return images, labels


def exact_bits(model: FractalGen, images: torch.Tensor, labels: torch.Tensor | None) -> float:
    """The model's negative log-likelihood of the images in bits (AR stacks: exact)."""
    bpd, _ = model.nll(images, labels)
    return float(bpd.double().sum()) * images[0].numel()


@pytest.mark.parametrize("types", [("ar", "ar", "ar"), ("mar", "mar", "ar")], ids=["ar", "mar"])
@pytest.mark.parametrize("channels", [1, 3], ids=["grey", "rgb"])
@pytest.mark.parametrize("conditional", [True, False], ids=["labels", "no-labels"])
def test_roundtrip_is_bit_exact(types, channels, conditional):
    """Five images in groups of two (the last one short): decoded bit for bit, labels and names back."""
    model = tiny(types, channels, class_num=10 if conditional else 0)
    images, labels = samples(model)
    names = [f"image {i}.png" for i in range(5)]
    data = compress(model, images, labels, names=names, group_size=2)
    out, out_labels = decompress(model, data)
    assert out.dtype == torch.uint8 and torch.equal(out, images)
    assert out_labels is None if labels is None else torch.equal(out_labels, labels)
    header = read_header(data)
    assert header.names == names and header.count == 5 and len(header.group_bytes) == 3


def test_noise_images_roundtrip_too():
    """Images the model finds unlikely (uniform noise) code to more bits but still come back exactly."""
    model = tiny()
    images = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8)
    data = compress(model, images, torch.tensor([1, 2, 3]))
    assert torch.equal(decompress(model, data)[0], images)
    assert sum(read_header(data).group_bytes) * 8 > 8 * images.numel()  # noise costs more than raw bytes here


def test_coded_bits_follow_the_likelihood_with_or_without_labels(monkeypatch):
    """The payload is the exact likelihood plus at most the stream's last words; without labels the
    model runs on the null condition (the unconditional likelihood), with labels on them."""
    model = tiny()
    images, labels = samples(model, n=6)
    conditions = []
    real_sample = FractalGen.sample

    def spy(self, labels=None, **kwargs):
        conditions.append(None if labels is None else labels.tolist())
        return real_sample(self, labels=labels, **kwargs)

    monkeypatch.setattr(FractalGen, "sample", spy)
    for given in (labels, None):
        data = compress(model, images, given, group_size=3)
        header = read_header(data)
        nll = exact_bits(model, images, given)
        payload = 8 * sum(header.group_bytes)
        assert nll - 1 <= payload <= nll * 1.001 + 64 * len(header.group_bytes)
        decompress(model, data)
    halves = [labels[:3].tolist(), labels[3:].tolist()]
    # encoder then decoder, one call per group (groups run on threads side by side, in any order)
    assert sorted(conditions[:4]) == sorted(halves * 2) and conditions[4:] == [None] * 4


def fashion_mnist_test(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` Fashion-MNIST test images and labels; skips the test without the dataset."""
    from fractalgen.data import FashionMNIST

    try:
        data = FashionMNIST("test")
    except Exception as e:  # the dataset package is optional
        pytest.skip(str(e))
    return torch.stack([data[i][0] for i in range(n)]), torch.tensor([data[i][1] for i in range(n)])


@pytest.mark.skipif(not (SHIPPED_MODEL / "config.json").is_file(), reason="no shipped model")
def test_shipped_model_codes_fashion_mnist_within_one_percent_of_its_likelihood():
    images, labels = fashion_mnist_test(48)
    model = load_model()
    blob = compress(model, images, labels, names=[f"{i}.png" for i in range(48)])
    header = read_header(blob)
    nll = exact_bits(model, images, labels)
    assert nll <= 8 * sum(header.group_bytes) <= nll * 1.01
    assert len(blob) * 8 <= nll * 1.05
    assert torch.equal(decompress(model, blob)[0], images)


def test_one_image_decodes_from_its_group_alone():
    """Decoding selected images reads only their groups: they decode even when another group is damaged."""
    model = tiny()
    images, labels = samples(model)
    data = bytearray(compress(model, images, labels, group_size=2))
    header = read_header(bytes(data))
    data[-1] ^= 0x40  # last group (image 4)
    out, out_labels = decompress(model, bytes(data), select=[3, 0])
    assert torch.equal(out, images[[3, 0]]) and out_labels.tolist() == [3, 0]
    with pytest.raises(CodecError, match="stream of image group 2 is corrupt"):
        decompress(model, bytes(data), select=[4])
    assert header.group_bytes[-1] > 0
    with pytest.raises(InputError, match="holds images 0..4"):
        decompress(model, bytes(data), select=[5])


def test_the_file_does_not_depend_on_threads_or_workers():
    """Written with 2 intra-op threads and 2 workers, read with 1 and 1: the same bytes, the same
    images; the coding runs on one intra-op thread (whatever the model samples with) and the
    caller's setting is restored."""
    model = tiny(("mar", "mar", "ar"))
    images, labels = samples(model, n=4)
    model.sampling_threads = 2
    seen = []
    real_call = codec._RangeChooser.__call__

    def spy(self, probs, targets):
        seen.append(torch.get_num_threads())
        return real_call(self, probs, targets)

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(codec._RangeChooser, "__call__", spy)
            data = compress(model, images, labels, group_size=2, workers=2)
        assert torch.get_num_threads() == 2 and set(seen) == {1}
        torch.set_num_threads(1)
        assert compress(model, images, labels, group_size=2, workers=1) == data
        assert torch.equal(decompress(model, data, workers=1)[0], images)
    finally:
        torch.set_num_threads(threads)


def test_a_model_in_train_mode_codes_in_eval_mode_and_stays_in_train_mode():
    """Train mode would drop labels at random (label_drop_prob); coding switches to eval mode and back."""
    model = tiny().train()
    images, labels = samples(model.eval(), n=6)
    model.train()
    data = compress(model, images, labels)
    assert model.training
    assert torch.equal(decompress(model, data)[0], images) and model.training


def test_mar_schedule_and_seed_are_recorded():
    """The MAR order comes from the seed and the schedule (default: one iteration per patch) from the
    file, so the decoder does not need to be told either."""
    model = tiny(("mar", "mar", "ar"))
    images, labels = samples(model)
    default = read_header(compress(model, images, labels))
    assert default.num_iter == (4, 16) and default.seed == 0
    data = compress(model, images, labels, num_iter=(1, 2), seed=7)
    header = read_header(data)
    assert header.num_iter == (1, 2) and header.seed == 7
    assert torch.equal(decompress(model, data)[0], images)
    other_order = compress(model, images, labels, num_iter=(1, 2), seed=8)
    assert other_order[-40:] != data[-40:] and torch.equal(decompress(model, other_order)[0], images)
    assert read_header(compress(tiny(), images, labels)).num_iter == ()  # AR stacks have no schedule


# ------------------------------------------------------------------------------------------------
# Bad files and bad inputs
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def coded():
    model = tiny()
    images, labels = samples(model)
    return model, images, compress(model, images, labels, names=[f"{i}.png" for i in range(5)], group_size=2)


def _payload_start(data: bytes) -> int:
    header = read_header(data)
    return len(data) - sum(header.group_bytes)


def test_every_flipped_byte_is_refused(coded):
    """A flip anywhere (magic, version, index size, index, its CRC, any stream) is a CodecError."""
    model, _, data = coded
    start = _payload_start(data)
    positions = list(range(start + 8)) + list(range(start + 8, len(data), 7)) + [len(data) - 1]
    for pos in positions:
        broken = bytearray(data)
        broken[pos] ^= 0x10
        with pytest.raises(CodecError):
            decompress(model, bytes(broken))


@pytest.mark.parametrize("cut", [0, 3, 5, 9, -1, -60])
def test_truncated_file_is_refused(coded, cut):
    model, _, data = coded
    with pytest.raises(CodecError, match="magic|ends early|truncated|corrupt"):
        decompress(model, data[:cut])


def test_extra_bytes_are_refused(coded):
    model, _, data = coded
    with pytest.raises(CodecError, match="followed by extra bytes"):
        decompress(model, data + b"\0")


def test_unknown_version_is_refused(coded):
    model, _, data = coded
    future = data[:4] + bytes([VERSION + 1]) + data[5:]
    with pytest.raises(CodecError, match=f"format version {VERSION + 1}, this fractalgen reads version {VERSION}"):
        decompress(model, future)


def test_other_file_types_are_refused(coded):
    model, _, _ = coded
    with pytest.raises(CodecError, match="wrong magic"):
        decompress(model, b"\x89PNG\r\n\x1a\n" + bytes(100))


def test_another_model_is_refused(coded):
    _, _, data = coded
    other = tiny(seed=1)
    with pytest.raises(CodecError, match="compressed with another model"):
        decompress(other, data)


def test_pixels_that_fail_their_crc_are_refused(coded, monkeypatch):
    """A decoder that computes other probabilities (here: other weights passed off as the right
    model, as another torch build could) decodes wrong pixels; their CRC32 refuses them."""
    model, _, data = coded
    monkeypatch.setattr(codec, "model_id", lambda m: read_header(data).model_id)
    with pytest.raises(CodecError, match="fail their CRC32"):
        decompress(tiny(seed=1), data)


def test_another_device_is_refused(coded):
    model, _, data = coded
    header = read_header(data)
    header.device = "cuda"
    with pytest.raises(CodecError, match="coded on cuda"):
        codec.check_model(model, header)


@pytest.mark.parametrize("kwargs, message", [
    (dict(images=torch.zeros(2, 1, 8, 8, dtype=torch.uint8)), "do not fit this model"),
    (dict(images=torch.zeros(2, 3, 8, 8)), "integer pixels"),
    (dict(images=torch.zeros(0, 3, 8, 8, dtype=torch.uint8)), "no images"),
    (dict(labels=torch.tensor([1])), "got 1 labels for 2 images"),
    (dict(labels=torch.tensor([1, 10])), "class id 10 is out of range"),
    (dict(names=["a.png"]), "got 1 names for 2 images"),
    (dict(names=["a.png", "../b.png"]), "not a plain file name"),
    (dict(group_size=0), "group_size must be >= 1"),
    (dict(seed=-1), "seed must be in"),
])
def test_bad_inputs_are_named(kwargs, message):
    model = tiny()
    args = dict(images=torch.zeros(2, 3, 8, 8, dtype=torch.uint8), labels=torch.tensor([0, 1]))
    args.update(kwargs)
    with pytest.raises(InputError, match=message):
        compress(model, **args)


def test_bad_mar_schedule_is_named():
    model = tiny(("mar", "mar", "ar"))
    with pytest.raises(InputError, match="num_iter must hold at most 2 values"):
        compress(model, torch.zeros(1, 3, 8, 8, dtype=torch.uint8), torch.tensor([0]), num_iter=(1, 1, 1))


def test_non_float32_models_are_refused():
    model = tiny().to(torch.bfloat16)
    with pytest.raises(CodecError, match="float32"):
        compress(model, torch.zeros(1, 3, 8, 8, dtype=torch.uint8), torch.tensor([0]))
