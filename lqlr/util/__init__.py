"""Helpers with no lqlr dependency: files, memory, meta-device construction."""
