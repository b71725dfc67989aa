import json

import pytest

from lqlr.bench import distortion as D
from lqlr.bench import main


@pytest.mark.parametrize("bits, reference", [(1, 0.3634), (2, 0.1175), (3, 0.03454), (4, 0.009497)])
def test_lloyd_max_matches_max_1960_table(bits, reference):
    assert D.lloyd_max_mse(bits) == pytest.approx(reference, rel=2e-3)


def test_gaussian_records_respect_rate_distortion_bound():
    states = {2: (8, 10, 12), 3: (12,), 4: (12,)}  # the bench's L = 16 trellises take most of a minute here
    records = D.gaussian_records(size=128, trellis_states=states)
    grids = [r for r in records if r["method"].startswith(("uniform", "nf"))]
    assert len(grids) == 12
    books = [r for r in records if r["method"].startswith(("e8p", "trellis"))]
    assert len(books) == 4 + sum(len(v) for v in states.values())
    trellis2 = {r["state_bits"]: r["error"] for r in books if r["method"].startswith("trellis") and r["bq"] == 2}
    assert trellis2[12] < trellis2[10] < trellis2[8]  # more states, less distortion
    for r in grids + books:
        # no quantizer storing R bits per sample beats D(R) = 2^(-2R) on an iid Gaussian
        assert r["error"] >= 2.0 ** (-2 * r["bits_per_param"])
        assert r["error"] < 0.35


def test_real_records_on_one_stories_block():
    records = D.real_records("stories260k", layers=[0], ranks=(4, 8), iters=2, n_samples=4, seq_len=64,
                             progress=False)
    methods = D.method_grid((4, 8), 2)
    assert len(records) == 7 * len(methods)
    summary = {s["method"]: s for s in D.summarize_real(records)}
    assert summary["LDLQ 2-bit"]["mean_error"] < summary["RTN 2-bit"]["mean_error"]
    assert summary["Q+LR 2-bit k=8 L,R 4-bit"]["mean_error"] < summary["LDLQ 2-bit"]["mean_error"]
    assert summary["LDLQ 4-bit"]["mean_error"] < summary["LDLQ 3-bit"]["mean_error"] < summary["LDLQ 2-bit"]["mean_error"]
    table = D.markdown(records)
    assert "| LDLQ 2-bit |" in table and "stories260k" in table


@pytest.mark.slow
def test_cli_quick_run_writes_json_and_table(tmp_path):
    main(["distortion", "--quick", "--skip-timing", "--iters", "2", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "distortion_quick.json").read_text())
    assert data["benchmark"] == "distortion_quick" and data["meta"]["iters"] == 2
    for r in data["records"]:
        assert {"section", "method", "bits_per_param", "error"} <= r.keys()
    assert (tmp_path / "distortion_quick.md").read_text().startswith("### iid Gaussian")


def test_inference_bench_times_a_given_export(stories_export, tmp_path):
    """``lqlr-bench inference --path``: an fp32 row for the export's source model, then the export with
    the packed kernel on every compressed linear; its bits are the manifest's."""
    import json

    from lqlr.bench.inference import run_paths
    from lqlr.nn.kernels import extension

    records = run_paths([str(stories_export)], tmp_path / "work", new_tokens=4, prompt_len=16, repeats=1,
                        progress=False)
    assert [r["kernel"] for r in records] == ["fp32", "auto"]
    manifest = json.loads((stories_export / "manifest.json").read_text())
    assert records[1]["bits_per_param"] == manifest["summary"]["bits_per_param"]
    used = records[1]["kernels_used"]
    assert sum(used.values()) == len(manifest["modules"])
    if extension() is not None:
        assert used == {"packed": len(manifest["modules"])}
    assert all(r["decode_tok_s"] > 0 for r in records)
    with pytest.raises(ValueError, match="not a folder"):
        run_paths([str(tmp_path / "missing")], tmp_path / "work")


def test_distortion_sections_merge_into_the_existing_results(tmp_path):
    """Rerunning one section replaces its records and keeps the others', with each section's command."""
    path = tmp_path / "distortion.json"
    old = [dict(section="gaussian", method="old g"), dict(section="real", method="old r"),
           dict(section="timing", method="old t")]
    path.write_text(json.dumps({"benchmark": "distortion", "meta": {"command": "lqlr-bench distortion", "wall_s": 5.0},
                                "records": old}))
    new = [dict(section="gaussian", method="new g")]
    records, meta = D.merge_sections(path, new, {"command": "lqlr-bench distortion --sections gaussian", "wall_s": 1.0},
                                     {"gaussian"})
    assert [r["method"] for r in records] == ["new g", "old r", "old t"]
    assert meta["sections"]["gaussian"]["command"].endswith("--sections gaussian")
    assert meta["sections"]["real"]["command"] == "lqlr-bench distortion"
    # a full run, or a first one, is written as it is
    assert D.merge_sections(tmp_path / "none.json", new, {"command": "c", "wall_s": 1.0}, {"gaussian"})[0] == new
