"""Per-image transforms (onebit.data.transforms) against hand-worked examples and plain torch references."""

import math

import pytest
import torch
import torch.nn.functional as F

from onebit.data.transforms import (
    CenterCrop,
    Compose,
    Normalize,
    RandomCrop,
    RandomHorizontalFlip,
    RandomResizedCrop,
    Resize,
    ToFloat,
    crop,
    resize,
)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def grid(c: int, h: int, w: int, dtype=torch.float32) -> torch.Tensor:
    """An image whose every value is distinct: value = ((c * H) + y) * W + x."""
    return torch.arange(c * h * w).reshape(c, h, w).to(dtype)


def reference_resize(img: torch.Tensor, size, antialias: bool = True) -> torch.Tensor:
    """Batched float bilinear interpolation of one image, as torch computes it."""
    return F.interpolate(img[None].float(), size=size, mode="bilinear", align_corners=False, antialias=antialias)[0]


def find_offset(out: torch.Tensor, padded: torch.Tensor) -> tuple[int, int]:
    """The one (top, left) at which ``out`` is a slice of ``padded``; fails unless exactly one matches."""
    h, w = out.shape[-2:]
    hits = [
        (top, left)
        for top in range(padded.shape[1] - h + 1)
        for left in range(padded.shape[2] - w + 1)
        if torch.equal(padded[:, top : top + h, left : left + w], out)
    ]
    assert len(hits) == 1, hits
    return hits[0]


RANDOM_TRANSFORMS = [
    RandomCrop(5, padding=2),
    RandomHorizontalFlip(),
    RandomResizedCrop((6, 4)),
]
DETERMINISTIC_TRANSFORMS = [
    ToFloat(),
    Normalize([0.5, 0.5, 0.5], [0.25, 0.25, 0.25]),
    Resize(5),
    CenterCrop(3),
]


# -- ToFloat, Normalize --------------------------------------------------------------------------


def test_to_float_divides_by_the_scale_in_float32():
    img = torch.tensor([[[0, 51], [128, 255]]], dtype=torch.uint8)
    out = ToFloat()(img)
    assert out.dtype == torch.float32
    assert torch.equal(out, torch.tensor([[[0.0, 0.2], [128 / 255, 1.0]]], dtype=torch.float32))
    assert torch.equal(ToFloat(2.0)(img), img.to(torch.float32) / 2.0)


def test_normalize_hand_worked_two_channels():
    img = torch.tensor([[[1.0, 3.0], [5.0, 7.0]], [[2.0, 6.0], [10.0, 14.0]]])
    out = Normalize(mean=[1.0, 2.0], std=[2.0, 4.0])(img)
    assert torch.equal(out, torch.tensor([[[0.0, 1.0], [2.0, 3.0]], [[0.0, 1.0], [2.0, 3.0]]]))


def test_normalize_is_exactly_the_float32_broadcast_arithmetic():
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    t = Normalize(mean, std)
    assert t.mean.dtype == t.std.dtype == torch.float32 and t.mean.shape == t.std.shape == (3,)
    x = torch.rand(3, 7, 5)
    m, s = torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)
    assert torch.equal(t(x), (x - m[:, None, None]) / s[:, None, None])


def test_normalize_names_both_shapes_when_channels_differ():
    with pytest.raises(ValueError, match=r"3 channels.*\(3,\).*\(1, 4, 4\)"):
        Normalize([0.5] * 3, [0.5] * 3)(torch.zeros(1, 4, 4))


# -- Resize --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, size, expected",
    [
        ((30, 45), 20, (20, 30)),
        ((45, 30), 20, (30, 20)),
        ((7, 10), 4, (4, 5)),  # int(4 * 10 / 7) = int(5.71) = 5
        ((10, 7), 4, (5, 4)),
        ((9, 9), 4, (4, 4)),
        ((30, 45), (11, 13), (11, 13)),
    ],
)
def test_resize_output_size(shape, size, expected):
    assert Resize(size)(torch.rand(2, *shape)).shape == (2, *expected)


def test_resize_hand_worked_bilinear():
    # Upsampling [0, 4] to 4 samples: centres at x = (i + 0.5) / 2 - 0.5 = -0.25, 0.25, 0.75, 1.25, clamped.
    assert torch.equal(Resize((1, 4))(torch.tensor([[[0.0, 4.0]]])), torch.tensor([[[0.0, 1.0, 3.0, 4.0]]]))
    row = torch.tensor([[[0.0, 4.0, 8.0, 12.0]]])
    # Halving without antialias samples at x = 0.5 and 2.5.
    assert torch.equal(Resize((1, 2), antialias=False)(row), torch.tensor([[[2.0, 10.0]]]))
    # With antialias the triangle widens to radius 2: weights 3/4, 3/4, 1/4 around centre 1.0 (and 3.0).
    expected = torch.tensor([[[(0 * 0.75 + 4 * 0.75 + 8 * 0.25) / 1.75, (4 * 0.25 + 8 * 0.75 + 12 * 0.75) / 1.75]]])
    torch.testing.assert_close(Resize((1, 2))(row), expected)


@pytest.mark.parametrize("channels", [1, 3, 5])
@pytest.mark.parametrize("size", [(5, 7), (23, 40), (12, 9)])
@pytest.mark.parametrize("antialias", [True, False])
def test_resize_float_matches_batched_interpolate(channels, size, antialias):
    img = torch.rand(channels, 12, 17)
    out = Resize(size, antialias=antialias)(img)
    assert out.dtype == torch.float32
    assert torch.equal(out, reference_resize(img, size, antialias))


@pytest.mark.parametrize("channels", [1, 3, 4, 5])
@pytest.mark.parametrize("size", [(5, 7), (23, 40), 8])
def test_resize_uint8_stays_uint8_within_one_of_float_reference(channels, size):
    img = torch.randint(0, 256, (channels, 16, 21), dtype=torch.uint8)
    out = Resize(size)(img)
    assert out.dtype == torch.uint8
    reference = reference_resize(img, out.shape[-2:]).round().clamp(0, 255)
    assert (out.float() - reference).abs().max() <= 1


def test_resize_antialiases_only_when_asked():
    img = torch.rand(3, 32, 32)
    assert not torch.allclose(Resize(8)(img), Resize(8, antialias=False)(img))


def test_resize_returns_the_input_when_size_matches():
    img = torch.rand(3, 8, 12)
    assert Resize(8)(img) is img
    assert Resize((8, 12))(img) is img


def test_resize_accepts_a_non_contiguous_view_and_half_precision():
    img = torch.rand(3, 20, 20)
    view = img[:, 2:15, 3:19]
    assert torch.equal(Resize((6, 7))(view), reference_resize(view.contiguous(), (6, 7)))
    half = Resize((6, 7))(img.half())
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), reference_resize(img.half().float(), (6, 7)), atol=1e-3, rtol=0)


# -- CenterCrop ----------------------------------------------------------------------------------


def test_center_crop_on_a_4x4_image():
    img = grid(1, 4, 4)
    assert torch.equal(CenterCrop(2)(img), torch.tensor([[[5.0, 6.0], [9.0, 10.0]]]))
    # (4 - 1) / 2 = 1.5 rounds to 2 (rows); (4 - 3) / 2 = 0.5 rounds to 0 (columns).
    assert torch.equal(CenterCrop((1, 3))(img), torch.tensor([[[8.0, 9.0, 10.0]]]))
    assert torch.equal(CenterCrop(4)(img), img)


@pytest.mark.parametrize(
    "side, crop_side, offset",
    [(5, 2, 2), (7, 2, 2), (6, 3, 2), (5, 3, 1), (9, 4, 2), (8, 5, 2)],  # round half to even: 1.5->2, 2.5->2
)
def test_center_crop_offsets_on_odd_and_even_sizes(side, crop_side, offset):
    img = grid(2, side, side + 1)
    out = CenterCrop((crop_side, crop_side))(img)
    left = int(round((side + 1 - crop_side) / 2.0))
    assert torch.equal(out, img[:, offset : offset + crop_side, left : left + crop_side])


def test_center_crop_zero_pads_an_image_smaller_than_the_crop():
    img = grid(1, 2, 3) + 1  # [[1, 2, 3], [4, 5, 6]]
    expected = torch.zeros(1, 4, 4)
    expected[0, 1:3, 0:3] = img[0]  # 2 rows of padding: 1 above, 1 below; 1 column: 0 left, 1 right
    assert torch.equal(CenterCrop(4)(img), expected)
    # Only the height is padded; the width (3 -> 2) is cropped at left = round(0.5) = 0.
    assert torch.equal(CenterCrop((5, 2))(img), torch.tensor([[[0.0, 0], [1, 2], [4, 5], [0, 0], [0, 0]]]))


# -- RandomCrop ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, fill", [(torch.float32, -1.0), (torch.uint8, 7)])
def test_random_crop_is_a_slice_of_the_padded_image(dtype, fill):
    img = grid(2, 6, 5, dtype) if dtype != torch.uint8 else grid(2, 6, 5).to(torch.uint8) + 10
    t = RandomCrop((4, 5), padding=2, fill=fill)
    padded = F.pad(img, (2, 2, 2, 2), value=fill)
    g = gen(3)
    for _ in range(20):
        out = t(img, g)
        assert out.shape == (2, 4, 5) and out.dtype == dtype
        find_offset(out, padded)


def test_random_crop_without_padding_crops_inside_the_image():
    img = grid(1, 4, 4)
    out = RandomCrop(2)(img, gen(0))
    top, left = find_offset(out, img)
    assert torch.equal(out, img[:, top : top + 2, left : left + 2])


def test_random_crop_offsets_cover_every_offset_uniformly():
    img = grid(1, 4, 4)
    t = RandomCrop(4, padding=1, fill=-1.0)  # (4 + 2 - 4 + 1)^2 = 9 offsets
    padded = F.pad(img, (1, 1, 1, 1), value=-1.0)
    g = gen(0)
    counts = {}
    for _ in range(900):
        offset = find_offset(t(img, g), padded)
        counts[offset] = counts.get(offset, 0) + 1
    assert set(counts) == {(top, left) for top in range(3) for left in range(3)}
    assert all(60 <= n <= 140 for n in counts.values()), counts  # expected 100 each


def test_random_crop_rejects_a_crop_larger_than_the_padded_image():
    with pytest.raises(ValueError, match=r"size \(9, 9\).*\(1, 4, 4\).*padded by 2"):
        RandomCrop(9, padding=2)(torch.zeros(1, 4, 4), gen(0))


# -- RandomHorizontalFlip ------------------------------------------------------------------------


def test_flip_mirrors_left_right():
    img = torch.tensor([[[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]])
    assert torch.equal(RandomHorizontalFlip(p=1.0)(img, gen(0)), torch.tensor([[[3.0, 2.0, 1.0], [6.0, 5.0, 4.0]]]))


def test_flip_probability():
    img = grid(3, 4, 5)
    g = gen(0)
    for _ in range(20):
        assert torch.equal(RandomHorizontalFlip(p=1.0)(img, g), img.flip(-1))
        assert torch.equal(RandomHorizontalFlip(p=0.0)(img, g), img)
    flips = 0
    t = RandomHorizontalFlip(p=0.25)
    for _ in range(400):
        out = t(img, g)
        assert torch.equal(out, img) or torch.equal(out, img.flip(-1))
        flips += torch.equal(out, img.flip(-1))
    assert 70 <= flips <= 130  # expected 100


# -- RandomResizedCrop ---------------------------------------------------------------------------


def test_random_resized_crop_boxes_lie_inside_with_area_and_aspect_in_range():
    height, width = 37, 53
    t = RandomResizedCrop(8)
    (s0, s1), (r0, r1) = t.scale, t.ratio
    boxes = set()
    for seed in range(300):
        top, left, h, w = t.get_params(height, width, gen(seed))
        assert 0 <= top and top + h <= height and 0 <= left and left + w <= width and h > 0 and w > 0
        # w, h are roundings of real w', h' (|w - w'| <= 1/2) with w' h' = area and w' / h' = r.
        assert (w - 0.5) * (h - 0.5) <= s1 * height * width and (w + 0.5) * (h + 0.5) >= s0 * height * width
        assert (w - 0.5) / (h + 0.5) <= r1 and (w + 0.5) / (h - 0.5) >= r0
        boxes.add((top, left, h, w))
    assert len(boxes) > 250  # random boxes, not a constant


def test_random_resized_crop_fixed_box_size_covers_every_offset():
    # scale 1/2 of 8 x 16 = 64 and ratio 1: every attempt gives the 8 x 8 box, left uniform in 0..8.
    t = RandomResizedCrop(4, scale=(0.5, 0.5), ratio=(1.0, 1.0))
    lefts = set()
    for seed in range(200):
        top, left, h, w = t.get_params(8, 16, gen(seed))
        assert (top, h, w) == (0, 8, 8)
        lefts.add(left)
    assert lefts == set(range(9))


@pytest.mark.parametrize("height, width", [(10, 8), (8, 10)])
def test_random_resized_crop_accepts_a_box_as_wide_or_tall_as_the_image(height, width):
    # area 64, ratio 1: the 8 x 8 box spans the short side and slides along the long one (0..2); the
    # fallback would always be the central box (offset 1).
    t = RandomResizedCrop(4, scale=(0.8, 0.8), ratio=(1.0, 1.0))
    boxes = {t.get_params(height, width, gen(seed)) for seed in range(60)}
    if height > width:
        assert boxes == {(top, 0, 8, 8) for top in range(3)}
    else:
        assert boxes == {(0, left, 8, 8) for left in range(3)}


@pytest.mark.parametrize(
    "height, width, scale, ratio, box",
    [
        # Square image, ratio >= 10: every attempt is too wide. Clamped ratio 10: w = 20, h = round(20 / 10) = 2.
        (20, 20, (0.9, 1.0), (10.0, 20.0), (9, 0, 2, 20)),
        # Tall 30 x 10, ratio <= 0.1: too tall. Clamped ratio 0.1: h = 30, w = round(30 * 0.1) = 3.
        (30, 10, (0.9, 1.0), (0.05, 0.1), (0, 3, 30, 3)),
        # Wide 10 x 40 (ratio 4) clamped to 4/3 after area 2..3 x the image fails: h = 10, w = round(13.33) = 13.
        (10, 40, (2.0, 3.0), (3 / 4, 4 / 3), (0, 13, 10, 13)),
        # Area larger than the image, image ratio in range: the whole image.
        (12, 14, (2.0, 3.0), (3 / 4, 4 / 3), (0, 0, 12, 14)),
    ],
)
def test_random_resized_crop_fallback_is_the_central_clamped_box(height, width, scale, ratio, box):
    t = RandomResizedCrop(5, scale=scale, ratio=ratio)
    for seed in range(5):
        assert t.get_params(height, width, gen(seed)) == box


def test_random_resized_crop_is_the_resized_box():
    img = torch.rand(3, 29, 41)
    t = RandomResizedCrop((7, 9))
    top, left, h, w = t.get_params(29, 41, gen(5))
    out = t(img, gen(5))
    assert out.shape == (3, 7, 9) and out.dtype == torch.float32
    assert torch.equal(out, reference_resize(img[:, top : top + h, left : left + w].contiguous(), (7, 9)))


def test_random_resized_crop_int_size_is_square_and_uint8_stays_uint8():
    img = torch.randint(0, 256, (3, 30, 40), dtype=torch.uint8)
    out = RandomResizedCrop(12)(img, gen(0))
    assert out.shape == (3, 12, 12) and out.dtype == torch.uint8


# -- randomness: the generator and nothing else ----------------------------------------------------


@pytest.mark.parametrize("transform", RANDOM_TRANSFORMS, ids=repr)
def test_same_seed_same_output_different_seeds_differ(transform):
    img = torch.rand(3, 9, 11)
    outputs = [transform(img, gen(seed)) for seed in range(8)]
    for seed in range(8):
        assert torch.equal(transform(img, gen(seed)), outputs[seed])
    distinct = {tuple(o.flatten().tolist()) for o in outputs}
    assert len(distinct) >= 2


@pytest.mark.parametrize("transform", RANDOM_TRANSFORMS, ids=repr)
def test_random_transforms_leave_the_global_rng_untouched(transform):
    img = torch.rand(3, 9, 11)
    before = torch.get_rng_state()
    g = gen(0)
    for _ in range(5):
        transform(img, g)
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("transform", RANDOM_TRANSFORMS, ids=repr)
def test_random_transforms_require_a_generator(transform):
    with pytest.raises(ValueError, match="generator"):
        transform(torch.rand(3, 9, 11))


@pytest.mark.parametrize("transform", DETERMINISTIC_TRANSFORMS, ids=repr)
def test_deterministic_transforms_ignore_the_generator(transform):
    img = torch.rand(3, 9, 11)
    g = gen(0)
    state = g.get_state()
    assert torch.equal(transform(img, g), transform(img))
    assert torch.equal(g.get_state(), state)


def test_compose_applies_in_order_with_one_generator():
    img = torch.randint(0, 256, (3, 12, 16), dtype=torch.uint8)
    steps = [
        RandomResizedCrop(10),
        RandomCrop(8, padding=2),
        RandomHorizontalFlip(),
        ToFloat(),
        Normalize([0.5] * 3, [0.2] * 3),
    ]
    g = gen(11)
    expected = img
    for t in steps:
        expected = t(expected, g)
    assert torch.equal(Compose(steps)(img, gen(11)), expected)
    assert torch.equal(Compose([])(img), img)


# -- validation and repr -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, name",
    [
        (lambda: Resize(0), "size"),
        (lambda: Resize(2.5), "size"),
        (lambda: Resize(True), "size"),
        (lambda: Resize((3,)), "size"),
        (lambda: Resize(4, antialias=1), "antialias"),
        (lambda: CenterCrop((0, 3)), "size"),
        (lambda: RandomCrop(-2), "size"),
        (lambda: RandomCrop(3, padding=-1), "padding"),
        (lambda: RandomCrop(3, fill="zero"), "fill"),
        (lambda: RandomHorizontalFlip(1.5), "p"),
        (lambda: RandomHorizontalFlip(-0.1), "p"),
        (lambda: RandomResizedCrop(0), "size"),
        (lambda: RandomResizedCrop(8, scale=(1.0, 0.5)), "scale"),
        (lambda: RandomResizedCrop(8, scale=(0.0, 1.0)), "scale"),
        (lambda: RandomResizedCrop(8, scale=0.5), "scale"),
        (lambda: RandomResizedCrop(8, ratio=(4 / 3, 3 / 4)), "ratio"),
        (lambda: RandomResizedCrop(8, ratio=(-1.0, 1.0)), "ratio"),
        (lambda: ToFloat(0), "scale"),
        (lambda: Normalize([0.5, 0.5], [0.5]), "mean and std"),
        (lambda: Normalize([0.5], [0.0]), "std"),
        (lambda: Compose([ToFloat(), 3]), r"transforms\[1\]"),
    ],
)
def test_construction_errors_name_the_argument(make, name):
    with pytest.raises(ValueError, match=name):
        make()


@pytest.mark.parametrize("transform", RANDOM_TRANSFORMS + DETERMINISTIC_TRANSFORMS, ids=repr)
@pytest.mark.parametrize(
    "bad, message",
    [
        (torch.zeros(4, 4), r"\[C, H, W\].*shape \(4, 4\)"),
        (torch.zeros(1, 3, 4, 4), r"\[C, H, W\].*shape \(1, 3, 4, 4\)"),
        (torch.zeros(3, 4, 4, dtype=torch.int32), r"uint8 or floating.*int32"),
        ([[[0.0]]], r"\[C, H, W\].*list"),
    ],
)
def test_calls_reject_anything_but_one_image(transform, bad, message):
    with pytest.raises(ValueError, match=message):
        transform(bad, gen(0))


def test_crop_and_resize_helpers():
    img = grid(1, 4, 4)
    assert torch.equal(crop(img, 1, 2, 2, 2), torch.tensor([[[6.0, 7.0], [10.0, 11.0]]]))
    with pytest.raises(ValueError, match=r"not inside the image of shape \(1, 4, 4\)"):
        crop(img, 3, 0, 2, 2)
    assert torch.equal(resize(img, (2, 2)), reference_resize(img, (2, 2)))


def test_reprs_are_readable():
    assert repr(ToFloat()) == "ToFloat(scale=255.0)"
    assert repr(Normalize([0.5, 0.25], [2.0, 4.0])) == "Normalize(mean=[0.5, 0.25], std=[2.0, 4.0])"
    assert repr(Resize(32)) == "Resize(size=32, antialias=True)"
    assert repr(CenterCrop(3)) == "CenterCrop(size=(3, 3))"
    assert repr(RandomCrop(32, padding=4)) == "RandomCrop(size=(32, 32), padding=4, fill=0)"
    assert repr(RandomHorizontalFlip()) == "RandomHorizontalFlip(p=0.5)"
    assert repr(RandomResizedCrop(8, scale=(0.5, 1), ratio=(1, 2))) == (
        "RandomResizedCrop(size=(8, 8), scale=(0.5, 1.0), ratio=(1.0, 2.0), antialias=True)"
    )
    assert repr(Compose([ToFloat(), RandomHorizontalFlip()])) == (
        "Compose([\n    ToFloat(scale=255.0),\n    RandomHorizontalFlip(p=0.5),\n])"
    )
    assert math.isclose(RandomResizedCrop(8).ratio[1], 4 / 3)
