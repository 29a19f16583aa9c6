"""``onebit.engine.bench``: the end-to-end comparison's arithmetic, file sizes and time split, on a
small pair (timings themselves are benchmarks, never asserted)."""

from __future__ import annotations

import io
import os
import time
import warnings

import pytest
import torch
from rich.console import Console

import onebit
from onebit import engine
from onebit.engine import bench


@pytest.fixture(scope="module")
def small_result():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return bench.end_to_end(bench.Pair.parse("lenet_binary:lenet@8"), threads=(1,), reps=2)


def test_a_pair_parses_as_binary_float_and_image_size():
    pair = bench.Pair.parse("birealnet18:resnet18@112")
    assert (pair.binary, pair.float, pair.image, pair.in_channels, pair.num_classes) == (
        "birealnet18",
        "resnet18",
        112,
        3,
        1000,
    )
    small = bench.Pair.parse("lenet_binary:lenet@8")
    assert (small.image, small.in_channels, small.num_classes) == (8, 1, 10)
    with pytest.raises(ValueError, match="expected BINARY:FLOAT"):
        bench.Pair.parse("birealnet18@224")


def test_the_headline_is_the_packed_model_on_an_nchw_input_against_the_float_model_at_its_best(small_result):
    t, s = small_result["timings_ms"][1], small_result["summary"][1]
    float_best = min(t["float nchw"], t["float channels_last"])
    assert s["packed_ms"] == pytest.approx(t["packed nchw"])
    assert s["packed_best_ms"] == pytest.approx(min(t["packed nchw"], t["packed channels_last"]))
    assert s["float_ms"] == pytest.approx(float_best)
    assert s["speedup"] == pytest.approx(float_best / t["packed nchw"])
    assert s["speedup_best"] == pytest.approx(float_best / s["packed_best_ms"])
    assert small_result["check"]["max_abs_diff"] == 0.0 and small_result["check"]["argmax_equal"]


def test_every_candidate_is_timed_warm_whatever_ran_before_it():
    # a call right after another candidate's is slow (its caches were evicted), later ones are quick: the
    # timed samples must see the quick ones only, whichever candidate comes after which
    last = [None]

    def candidate(name):
        def call():
            if last[0] != name:
                time.sleep(0.05)
            last[0] = name

        return call

    medians = bench._interleaved({"a": candidate("a"), "b": candidate("b")}, reps=3, target=0.005)
    assert max(medians.values()) < 1e-4  # one cold call in a sample of 50 would be 1e-3 a call


def test_file_sizes_are_the_bytes_of_the_saved_files(tmp_path):
    binary = onebit.models.create("lenet_binary", num_classes=10, in_channels=1).eval()
    twin = onebit.models.create("lenet", num_classes=10, in_channels=1).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        packed = engine.pack(binary, torch.randn(1, 1, 8, 8))
    sizes = bench.file_sizes(binary, twin, packed)
    packed.save(tmp_path / "p.safetensors")
    onebit.io.save_tensors(str(tmp_path / "b.safetensors"), binary.state_dict())
    assert sizes["packed"] == os.path.getsize(tmp_path / "p.safetensors")
    assert sizes["binary_state_dict"] == os.path.getsize(tmp_path / "b.safetensors")
    assert sizes["packed"] < sizes["binary_state_dict"]


def test_the_time_split_has_one_row_per_op_kind_counting_every_step(small_result):
    binary = onebit.models.create("lenet_binary", num_classes=10, in_channels=1).eval()
    x = torch.randn(2, 1, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        packed = engine.pack(binary, x)
    rows = bench.op_breakdown(packed, x, repeat=2)
    labels = [step.label for step in packed._steps]
    assert sorted((op, n) for op, _, n in rows) == sorted((op, labels.count(op)) for op in set(labels))
    assert [ms for _, ms, _ in rows] == sorted((ms for _, ms, _ in rows), reverse=True)


def test_the_report_prints_the_headline_and_best_vs_best(small_result):
    out = io.StringIO()
    bench.print_report(small_result, Console(file=out, width=200, color_system=None))
    text = out.getvalue()
    assert "speedup" in text and "best vs best" in text and "on an NCHW input" in text
    assert f"{small_result['summary'][1]['speedup']:.2f}x" in text
