"""The export folder is a hub repository as it is: nothing but the export's files (upload_folder-ready), a
README.md model card with hub front matter, editable without breaking the checksums, and a copy laid out
as a hub download (snapshot files linking to cache blobs) loads with from_pretrained and PEFT. Offline."""
import hashlib
import json
import os
import shutil

import pytest
import torch

import lqlr
from lqlr.io.card import base_model, model_card
from lqlr.io.export import IntegrityError, read_manifest

PROBE = torch.randint(3, 512, (2, 24), generator=torch.Generator().manual_seed(3))
TINY = lqlr.CompressConfig(qlr=lqlr.QLRConfig(bq=3, rank=4, group_size=32, iters=1, incoherence=True),
                           calibration=lqlr.CalibrationConfig(source="wikitext2", n_samples=4, seq_len=64))


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """stories260K through lqlr.compress with block checkpoints (resume_dir), as lqlr-compress runs it."""
    root = tmp_path_factory.mktemp("hub")
    out, ckpt = root / "s3", root / "s3.checkpoints"
    lqlr.compress("stories260k", TINY, output_dir=out, resume_dir=ckpt, progress=False)
    assert not ckpt.exists()  # checkpoints removed once the export is complete
    return out


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def _files(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def _front_matter(path):
    from huggingface_hub import ModelCard

    return ModelCard.load(path).data.to_dict()


def test_the_folder_holds_exactly_the_export_and_is_what_upload_folder_sends(export):
    from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects

    manifest = read_manifest(export)
    files = _files(export)
    assert files == sorted([*manifest["files"], "manifest.json", "README.md"])  # no temp or checkpoint file
    assert not [f for f in files if f.endswith(".tmp") or "checkpoint" in f]
    assert "README.md" not in manifest["files"]  # the card is documentation, outside the checksums
    # upload_folder sends every file of the folder but DEFAULT_IGNORE_PATTERNS (.git/, .cache/huggingface/)
    assert sorted(filter_repo_objects(files, ignore_patterns=DEFAULT_IGNORE_PATTERNS)) == files
    assert {"config.json", "model.safetensors", "tokenizer.json", "adapter/adapter_config.json",
            "adapter/adapter_model.safetensors"} <= set(files)


def test_model_card_front_matter_and_body(export):
    manifest = read_manifest(export)
    meta = _front_matter(export / "README.md")
    assert meta["library_name"] == "transformers"
    assert meta["base_model"] == "karpathy/tinyllamas" and meta["base_model_relation"] == "quantized"
    assert meta["tags"] == ["lqlr", "quantized"]
    card = (export / "README.md").read_text()
    bits = manifest["summary"]["bits_per_param"]
    assert f"stories260k · lqlr, {bits:.3f} bits per weight" in card
    assert "| Q grid (linears) | 3-bit uniform (35) |" in card and "| L·R factors (linears) | 4-bit (35) |" in card
    assert "| incoherence rotation | 35 of 35 linears |" in card
    assert "Perplexity and KL: not measured" in card  # lqlr.compress alone evaluates nothing
    assert "import lqlr" in card and 'PATH + "/adapter"' in card
    assert model_card(manifest) == card  # deterministic: the same export writes the same bytes


def test_card_with_measured_quality_and_base_model_names(tmp_path, monkeypatch):
    manifest = {"source": {"model": "org/some-model", "method": "caldera"}, "summary": {"bits_per_param": 2.5},
                "modules": {"a": {"spec": {"q": {"bits": 2, "kind": "uniform"}, "rank": 0}}}}
    card = model_card(manifest, {"ppl": 12.3456, "ppl_reference": 11.0, "kl": 0.0321, "eval_tokens": 2048,
                                 "eval_seq_len": 512})
    assert "| perplexity | 12.35 |" in card and "| KL(uncompressed ‖ compressed), nats/token | 0.0321 |" in card
    assert "WikiText-2 test, 2,048 tokens in windows of 512" in card and "not measured" not in card
    assert "adapter" not in card.split("## Use")[1]  # a Q-only export has no adapter to show
    (tmp_path / "README.md").write_text(card)
    assert _front_matter(tmp_path / "README.md")["base_model"] == "org/some-model"
    assert base_model("smollm2-135m") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    (tmp_path / "local").mkdir()
    monkeypatch.chdir(tmp_path)
    assert base_model("local/..") is None and base_model(str(tmp_path / "local")) is None
    assert base_model("tmp/nothing-here") == "tmp/nothing-here" and base_model(None) is None
    no_base = model_card({**manifest, "source": {"model": str(tmp_path / "local")}})
    assert "base_model" not in no_base.split("---")[1]  # a local folder is never named as base_model


def test_editing_the_readme_keeps_the_model_loadable(export, tmp_path):
    from transformers import AutoModelForCausalLM

    copy = tmp_path / "edited"
    shutil.copytree(export, copy)
    with open(copy / "README.md", "a") as f:
        f.write("\n## My notes\n\nEdited on the hub.\n")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"]["README.md"] = "0" * 64  # even a manifest that lists it: README.md is never verified
    (copy / "manifest.json").write_text(json.dumps(manifest))
    lqlr.load(copy)
    AutoModelForCausalLM.from_pretrained(copy)
    (copy / "README.md").unlink()  # nor required
    lqlr.load(copy)
    data = bytearray((copy / "config.json").read_bytes())  # every other file still is verified
    (copy / "config.json").write_bytes(bytes(data.replace(b'"vocab_size"', b'"vocab_size" ')))
    with pytest.raises(IntegrityError, match="config.json does not match its sha256"):
        lqlr.load(copy)


def _as_hub_download(export, cache):
    """The export as huggingface_hub's cache lays out a download: every file a blob named by its hash, the
    snapshot folder a tree of symbolic links to those blobs."""
    snapshot = cache / "models--org--s3" / "snapshots" / ("0" * 40)
    blobs = cache / "models--org--s3" / "blobs"
    blobs.mkdir(parents=True)
    for rel in _files(export):
        data = (export / rel).read_bytes()
        blob = blobs / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return snapshot


@pytest.mark.parametrize("layout", ["copy", "hub_cache"])
def test_a_downloaded_copy_loads_with_from_pretrained_and_peft(export, tmp_path, layout):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    if layout == "copy":
        folder = tmp_path / "downloaded"
        shutil.copytree(export, folder)
    else:
        folder = _as_hub_download(export, tmp_path / "cache")
        assert (folder / "model.safetensors").is_symlink()
    ours = lqlr.load(export)
    model = AutoModelForCausalLM.from_pretrained(folder)  # checksums verified through the links
    with torch.no_grad():
        full = ours(PROBE).logits
        torch.testing.assert_close(model(PROBE).logits, full, rtol=1e-6, atol=1e-6)
        peft_model = PeftModel.from_pretrained(model, str(folder / "adapter"))
        assert _rel(peft_model(PROBE).logits, full) <= 1e-5  # as in test_hf_integration
        with peft_model.disable_adapter():  # the adapter is the L·R part: without it, Q alone
            assert _rel(peft_model(PROBE).logits, full) > 1e-3


def test_from_pretrained_with_only_what_transformers_downloads_says_what_to_do(export, tmp_path):
    from transformers import AutoModelForCausalLM

    partial = tmp_path / "partial"
    partial.mkdir()
    for name in ("config.json", "model.safetensors"):  # from_pretrained("org/name") fetches only these
        shutil.copy(export / name, partial / name)
    with pytest.raises(IntegrityError, match=r"no manifest.json.*snapshot_download"):
        AutoModelForCausalLM.from_pretrained(partial)


def test_save_pretrained_keeps_the_card(export, tmp_path):
    from transformers import AutoModelForCausalLM

    copy = tmp_path / "measured"
    shutil.copytree(export, copy)
    (copy / "README.md").write_text(model_card(read_manifest(copy), {"ppl": 99.0}))
    again = AutoModelForCausalLM.from_pretrained(copy).save_pretrained(tmp_path / "again")
    assert (again / "README.md").read_bytes() == (copy / "README.md").read_bytes()


def test_lqlr_compress_writes_its_measured_quality_into_the_card(tmp_path):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from lqlr.cli.compress import CONFIG_DIR, register_configs, run

    register_configs()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = OmegaConf.to_object(compose(config_name="config", overrides=[
            "model=stories260k", "data=wikitext2", "data.n_samples=4", "data.seq_len=64", "method=caldera",
            "method.iters=1", "budget.bits=3.0", "eval.seq_len=128", "eval.max_windows=1", "progress=false",
            f"output_dir={tmp_path / 'out'}"]))
    result = run(cfg, tmp_path)
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"| perplexity | {result['ppl']:.4g} |" in card and f"{result['kl']:.4g}" in card
    assert "not measured" not in card
    assert _front_matter(tmp_path / "out" / "README.md")["base_model"] == "karpathy/tinyllamas"
    lqlr.load(tmp_path / "out")  # checksums still valid
