"""Checkpoint directories: validation, lazy tensor and expert-slice reads, key roles, writes."""

from scoutq.checkpoint.layout import MULTIMODAL, TEXT_ONLY, KeyRole, Layout, Role
from scoutq.checkpoint.reader import Checkpoint

__all__ = ["Checkpoint", "KeyRole", "Layout", "MULTIMODAL", "Role", "TEXT_ONLY"]
