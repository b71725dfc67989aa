"""lqlr-bench load: from_pretrained and lqlr.load of an export, each measured in a child process."""
import json
import struct

import pytest

from lqlr.bench import load as L
from lqlr.bench import main as bench

FIELDS = {"path", "model", "method", "bits_per_param", "n_modules", "loader", "load_s", "startup_s", "warmup_s",
          "rss_imports_mb", "baseline_mb", "peak_load_mb", "peak_mb", "rss_after_mb", "peak_reset", "memory_mb", "memory_linears_mb",
          "n_qlr_linear", "dtype", "call", "dtype_requested", "rss_anon_growth_mb", "rss_file_growth_mb", "stored_mb", "stored_packed_mb", "stored_untouched_mb", "peak_minus_baseline_mb",
          "overhead_stored", "overhead_memory", "overhead_stored_cold", "pass_stored", "pass_memory", "factor"}


def test_stored_bytes_are_the_safetensors_payload(stories_export):
    manifest = L.check_export(stories_export)
    stored = L.stored_tensor_bytes(stories_export, manifest)
    data = (stories_export / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    assert stored["total"] == len(data) - 8 - n  # every byte after the header is tensor data
    assert stored["total"] == stored["packed"] + stored["untouched"] and 0 < stored["packed"] < stored["total"]


def test_bench_load_measures_both_loaders_in_children(stories_export, tmp_path, monkeypatch):
    # the children use the pure-torch kernels: no wait on (or rebuild of) the compiled extension's cache
    monkeypatch.setenv("LQLR_NO_EXTENSION", "1")
    bench(["load", "--path", str(stories_export), "--warmup", str(stories_export), "--repeats", "1",
           "--out", str(tmp_path), "--name", "load"])
    result = json.loads((tmp_path / "load.json").read_text())
    records = result["records"]
    assert [r["call"] for r in records] == ["from_pretrained", "lqlr.load"]
    manifest = json.loads((stories_export / "manifest.json").read_text())
    for r in records:
        assert FIELDS <= r.keys(), FIELDS - r.keys()
        assert r["bits_per_param"] == manifest["summary"]["bits_per_param"] and r["n_qlr_linear"] == 35
        assert r["peak_mb"] >= r["peak_load_mb"] >= r["baseline_mb"] > 0 and r["rss_after_mb"] > 0 and r["load_s"] > 0
        assert r["warmup"] == stories_export.name and r["warmup_s"] > 0  # by name: no machine path in results
        assert r["dtype"] == "float32" and r["memory_linears_mb"] < r["memory_mb"]
        # untouched tensors stored in 16 bits, held in float32: more in memory than on disk
        assert r["stored_mb"] < r["memory_mb"] < 2 * r["stored_mb"]
        assert r["overhead_stored"] == pytest.approx((r["peak_mb"] - r["baseline_mb"]) / r["stored_mb"])
        assert r["pass_stored"] == (r["overhead_stored"] <= 1.15)
    assert result["meta"]["command"].startswith("lqlr-bench load --path")
    table = (tmp_path / "load.md").read_text()
    assert "| s3 | – |" in table and "against the stored bytes" in table


def test_bench_load_refuses_a_folder_that_is_not_an_export(tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        bench(["load", "--path", str(tmp_path)])
    assert err.value.code == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert "manifest.json not found: not an lqlr export" in message
    with pytest.raises(SystemExit):
        bench(["load", "--path", str(tmp_path / "nowhere")])
    assert "is not a folder" in capsys.readouterr().err


def test_bench_load_refuses_an_export_without_quantization_config(stories_export_copy, capsys):
    """An export from before from_pretrained support: transformers would build a dense model from it."""
    config = json.loads((stories_export_copy / "config.json").read_text())
    del config["quantization_config"]
    (stories_export_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit):
        bench(["load", "--path", str(stories_export_copy)])
    assert "has no quantization_config with quant_method 'lqlr'" in capsys.readouterr().err
