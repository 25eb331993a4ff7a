"""Typed events streamed by every long stage. The app renders them, the CLI prints them, tests assert on them."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np


@dataclass
class StageStarted:
    stage: str          # "load" | "synthesis" | "calibration" | "finetune" | "evaluate" | "save"
    total_steps: int = 0
    message: str = ""


@dataclass
class Progress:
    stage: str
    step: int           # 1-based
    total_steps: int
    elapsed: float      # seconds since the stage began
    losses: dict[str, float] = field(default_factory=dict)       # loss terms by name
    bn_log_likelihood: float | None = None                       # mean per (layer, channel)
    layer_log_likelihood: list[float] | None = None              # per BN layer
    student_kl: dict[str, float] = field(default_factory=dict)   # KL(teacher || student) per student
    block: str | None = None                                     # the unit being reconstructed (stage "reconstruct")

    @property
    def eta(self) -> float:
        return self.elapsed / max(self.step, 1) * (self.total_steps - self.step)


@dataclass
class Preview:
    stage: str
    step: int
    images: np.ndarray  # (N, H, W, C) uint8
    labels: list[int]
    class_names: list[str] | None = None


@dataclass
class Message:
    text: str
    level: str = "info"


@dataclass
class Stopped:
    stage: str
    step: int


@dataclass
class Done:
    report: dict[str, Any]
    out_dir: str | None


def drain(events: Iterator, keep: bool = True) -> tuple[list, Any]:
    """Run a stage's generator of events to its end. Returns (the events, or [] when not `keep`; the value the
    generator returned, e.g. a SynthResult)."""
    out = []
    while True:
        try:
            ev = next(events)
        except StopIteration as stop:
            return out, stop.value
        if keep:
            out.append(ev)
