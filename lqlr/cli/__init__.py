"""The command lines: lqlr-compress, lqlr-eval, lqlr-diagnose, lqlr-finetune (Hydra lives only here)."""
