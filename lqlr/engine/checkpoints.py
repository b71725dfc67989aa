"""Per-block checkpoints, so a killed compression resumes where it stopped with identical output.

After each decoder block, its QLRLinear modules (packed tensors, bias, spec) and reports are written
to one safetensors file, atomically (temp file + fsync + rename). A restart with the same command
loads the finished blocks instead of recomputing them; a fingerprint of the model, the calibration
ids and the configuration guards against resuming a different run.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors.torch import load_file, save_file

from lqlr.nn.layer import QLRLinear
from lqlr.util.files import atomic_write


class BlockCheckpoints:
    """One file per finished block under ``folder``."""

    def __init__(self, folder: str | os.PathLike, run_id: str) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.run_id = run_id
        for stale in self.folder.glob("*.tmp"):  # a write that was interrupted: never a valid checkpoint
            stale.unlink()

    def path(self, i: int) -> Path:
        return self.folder / f"block_{i:05d}.safetensors"

    def save(self, i: int, modules: dict[str, QLRLinear], reports: list[dict]) -> None:
        tensors, specs = {}, {}
        for name, m in modules.items():
            for k, v in m.packed_tensors().items():
                tensors[f"{name}.{k}"] = v.contiguous()
            if m.bias is not None:
                tensors[f"{name}.bias"] = m.bias.detach().contiguous()
            specs[name] = {"spec": m.spec, "in": m.in_features, "out": m.out_features, "bias": m.bias is not None}
        meta = {"run_id": self.run_id, "block": str(i), "modules": json.dumps(specs), "reports": json.dumps(reports)}
        atomic_write(self.path(i), lambda tmp: save_file(tensors, str(tmp), metadata=meta))
        dir_fd = os.open(self.folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def load(self, i: int) -> tuple[dict[str, QLRLinear], list[dict]] | None:
        """The modules and reports of block ``i``, or None if it has no checkpoint."""
        path = self.path(i)
        if not path.is_file():
            return None
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("run_id") != self.run_id:
            raise ValueError(f"{path} belongs to a different run (other model, data or config): "
                             f"delete {self.folder} or choose another output_dir")
        tensors = load_file(str(path))
        modules = {}
        for name, info in json.loads(meta["modules"]).items():
            m = QLRLinear(info["in"], info["out"], info["spec"], bias=info["bias"])
            m.load_packed({k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".") and not k.endswith(".bias")
                           and k[len(name) + 1:] in dict(m.named_buffers(recurse=False))})
            if info["bias"]:
                m.bias.data.copy_(tensors[f"{name}.bias"])
            modules[name] = m
        return modules, json.loads(meta["reports"])
