"""``lqlr-finetune``: fine-tune an lqlr export's L, R (a LoRA adapter) on the frozen, packed Q base.

    lqlr-finetune path=out/s3 train.steps=200              # -> out/s3.finetuned/adapter
    lqlr-finetune path=out/s3 merge=true requantize=true   # + merged/ and requantized/ (L, R back on their grids)
    lqlr-finetune path=out/s3 train.qat=true requantize=true requant.method=nearest   # quantization-aware
    lqlr-finetune path=out/q3 rank=16                      # a Q-only export: zero-initialised LoRA of rank 16

Config: lqlr/cli/configs/finetune.yaml (Hydra). Trains on WikiText-2 validation (random windows), evaluates
WikiText-2 test perplexity before and after, and writes ``<output_dir>/finetune.json`` (losses,
perplexities, peak RSS of the training loop, times) next to the stock PEFT ``adapter/``.
"""
from __future__ import annotations

import gc
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from transformers import AutoTokenizer

from lqlr.calibrate.text import calibration_ids, source_text
from lqlr.config import EvalConfig
from lqlr.eval.metrics import perplexity, wikitext2_windows
from lqlr.finetune.lora import prepare
from lqlr.finetune.merge import merge_adapter
from lqlr.finetune.qat import disable_qat, enable_qat
from lqlr.finetune.requantize import RequantizeConfig, requantize_adapter
from lqlr.finetune.train import FinetuneConfig, train
from lqlr.io.card import write_model_card
from lqlr.io.export import read_manifest
from lqlr.io.load import load
from lqlr.util.memory import module_memory_mb, peak_rss_mb, reset_peak_rss, rss_mb

log = logging.getLogger("lqlr.finetune")
CONFIG_DIR = Path(__file__).resolve().parent / "configs"


@dataclass
class DataConf:
    source: str = "wikitext2"  # wikitext2 (validation split) | text (path: a file or folder of .txt)
    path: Optional[str] = None


@dataclass
class AppConf:
    path: str = "???"
    output_dir: str = "${path}.finetuned"
    init: str = "export"
    base: str = "packed"
    lora_like: Optional[str] = None
    rank: Optional[int] = None
    train: FinetuneConfig = field(default_factory=FinetuneConfig)
    data: DataConf = field(default_factory=DataConf)
    eval: EvalConfig = field(default_factory=EvalConfig)
    merge: bool = False
    requantize: bool = False
    requant: RequantizeConfig = field(default_factory=RequantizeConfig)
    progress: bool = True


def _text(cfg: DataConf) -> str:
    if cfg.source not in ("wikitext2", "text"):
        raise ValueError(f"data.source={cfg.source!r}: choose wikitext2 or text")
    return source_text(cfg.source, cfg.path)


def run(cfg: AppConf) -> dict[str, Any]:
    """Prepare, evaluate, train, save, reload-check, evaluate; optional merge and requantize."""
    t_start = time.perf_counter()
    tcfg = cfg.train
    path, out = Path(cfg.path), Path(cfg.output_dir)
    manifest = read_manifest(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = prepare(path, cfg.init, cfg.base, cfg.lora_like, cfg.rank, seed=tcfg.seed)
    windows = calibration_ids(tokenizer, _text(cfg.data), tcfg.steps * tcfg.batch_size, tcfg.seq_len, tcfg.seed)
    record: dict[str, Any] = {"path": str(path), "init": cfg.init, "lora_rank": cfg.rank, "base": cfg.base, "source_model": manifest["source"]["model"],
                              "bits_per_param": manifest["summary"]["bits_per_param"], "train_tokens": windows.numel()}
    test = wikitext2_windows(model, tokenizer, cfg.eval.seq_len, cfg.eval.max_windows) if cfg.eval.enabled else None
    if test is not None:
        record["eval_tokens"] = test.numel()
        record["ppl_before"] = perplexity(model, test, cfg.eval.batch_size, cfg.progress)
        log.info("WikiText-2 test ppl before: %.3f", record["ppl_before"])
    mem = module_memory_mb(model)
    record["weights_frozen_mb"], record["weights_trainable_mb"] = mem["frozen"], mem["trainable"]
    reset_peak_rss()
    record["rss_before_train_mb"] = rss_mb()
    res = train(model, windows, tcfg, progress=cfg.progress)
    record["peak_rss_train_mb"] = peak_rss_mb()
    record.update(res.to_dict())
    out.mkdir(parents=True, exist_ok=True)
    adapter = out / "adapter"
    model.save_pretrained(adapter, save_embedding_layers=False)  # LoRA only: no hub lookup of the base
    if cfg.base == "packed":  # the saved adapter must reload to the very same logits
        probe = windows[:2, :64]
        if tcfg.qat:  # the saved B, A are the real-valued ones: compare without the grids
            disable_qat(model)
        with torch.no_grad():
            mine = model(probe).logits
            again = load(path, peft=True, verify=False, adapter=adapter)(probe).logits
        record["reload_max_abs_diff"] = float((mine - again).abs().max())
        if tcfg.qat:
            enable_qat(model)
    if test is not None:
        record["ppl_after"] = perplexity(model, test, cfg.eval.batch_size, cfg.progress)
        log.info("WikiText-2 test ppl after: %.3f", record["ppl_after"])
    del model
    gc.collect()
    if cfg.merge:
        record["merged"] = str(merge_adapter(path, adapter, out / "merged"))
    if cfg.requantize:
        info = {"steps": tcfg.steps, "init": cfg.init, "train_tokens": windows.numel(), "qat": tcfg.qat}
        record["requant_method"] = cfg.requant.method
        record["requantize"] = requantize_adapter(path, adapter, out / "requantized", info=info, cfg=cfg.requant,
                                                  text=_text(cfg.data), progress=cfg.progress)
        if test is not None:
            record["ppl_requantized"] = perplexity(load(out / "requantized", verify=False), test, cfg.eval.batch_size,
                                                   cfg.progress)
            write_model_card(out / "requantized", quality={"ppl": record["ppl_requantized"],
                                                           "eval_tokens": record["eval_tokens"],
                                                           "eval_seq_len": int(test.shape[1])})
            log.info("WikiText-2 test ppl after requantizing L, R: %.3f", record["ppl_requantized"])
    record["wall_s"] = time.perf_counter() - t_start
    record["config"] = asdict(cfg)
    (out / "finetune.json").write_text(json.dumps(record, indent=1))
    return record


def register_configs() -> None:
    """Register the schema of ``lqlr-finetune`` with Hydra's ConfigStore."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="finetune_schema", node=AppConf)


def main() -> None:
    import hydra
    from omegaconf import OmegaConf

    register_configs()

    @hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="finetune")
    def _app(dcfg) -> None:
        cfg: AppConf = OmegaConf.to_object(dcfg)
        record = run(cfg)
        keys = ("ppl_before", "ppl_after", "ppl_requantized", "train_s", "peak_rss_train_mb", "reload_max_abs_diff")
        print(json.dumps({k: record[k] for k in keys if k in record}, indent=1))
        print(f"adapter: {Path(cfg.output_dir) / 'adapter'}")

    _app()


if __name__ == "__main__":
    sys.exit(main())
