"""Parsers against the stock tools' real outputs (tests/fixtures/tool-outputs)."""

from pathlib import Path

import pytest

from profilers.parsers import (
    ParseError,
    cpu_temperature,
    parse_benchmark_model,
    parse_onnxruntime_perf_test,
    parse_thermalservice,
    parse_xdputil,
)

FIXTURES = Path(__file__).parent / "fixtures" / "tool-outputs"


def _read(name: str) -> str:
    return (FIXTURES / name).read_text()


def test_benchmark_model_recent_format():
    r = parse_benchmark_model(_read("benchmark_model.android_arm64.log"))
    assert r.avg_ms == pytest.approx(63.7432)
    assert r.count == 1000  # the timed run's count, not the warm-up's (9), and beyond --num_runs
    assert r.median_ms == pytest.approx(51.891)
    assert r.p_low_ms == pytest.approx(49.620) and r.p_high_ms == pytest.approx(68.628)
    assert r.typical_ms == pytest.approx(51.891)


def test_benchmark_model_legacy_format():
    r = parse_benchmark_model(_read("benchmark_model.legacy.log"))
    assert r.avg_ms == pytest.approx(79.7609)
    assert r.count == 50 and r.median_ms is None and r.std_ms == pytest.approx(0.702)
    assert r.typical_ms == pytest.approx(79.7609)


def test_benchmark_model_failure_names_the_error():
    with pytest.raises(ParseError, match=r"Could not open '/data/local/tmp/spvit/missing.tflite'"):
        parse_benchmark_model(_read("benchmark_model.failed.log"))


def test_onnxruntime_perf_test_units():
    r = parse_onnxruntime_perf_test(_read("onnxruntime_perf_test.log"))
    assert r.avg_ms == pytest.approx(1.85739)
    assert r.median_ms == pytest.approx(1.85674)  # seconds in the log
    assert r.p_high_ms == pytest.approx(1.87215) and r.count == 100
    newer = parse_onnxruntime_perf_test(_read("onnxruntime_perf_test.newer.log"))
    assert newer.avg_ms == pytest.approx(98.961997) and newer.median_ms == pytest.approx(98.7564)
    assert newer.count == 50


def test_xdputil_fps_line():
    text = (
        "I1121 10:00:00.1 benchmark.cpp:123] writing report to <STDOUT>\n"
        "FPS= 250.00 number_of_frames= 7500 time= 30.00 seconds.\n"
    )
    assert parse_xdputil(text).avg_ms == pytest.approx(4.0)
    assert parse_xdputil(text, threads=2).avg_ms == pytest.approx(8.0)
    assert parse_xdputil(text).count == 7500


@pytest.mark.parametrize(
    "parser", [parse_benchmark_model, parse_onnxruntime_perf_test, parse_xdputil], ids=lambda p: p.__name__
)
@pytest.mark.parametrize("garbage", ["", "Segmentation fault\n", "Inference timings in us: Init: x\nFPS= -1\n"])
def test_garbled_output_is_a_parse_error(parser, garbage):
    with pytest.raises(ParseError):
        parser(garbage)


def test_thermalservice_reads_only_current_hal_block():
    temps = parse_thermalservice(_read("dumpsys_thermalservice.log"))
    assert [t.name for t in temps] == ["CPU0", "CPU4", "battery", "skin"]  # not the cached ones
    assert cpu_temperature(temps) == pytest.approx(42.1)
    with pytest.raises(ParseError):
        parse_thermalservice("Thermal Status: 0\n")
