"""What a worker process needs to know, sent to it once when it starts."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from bot.config import Config
from bot.topics import ModelRole

# What a worker reports it "loads" while it starts (imports torch, preloads models): its start
# is watched by the same heartbeat as a model load.
STARTING = "(starting)"


@dataclass(frozen=True)
class WorkerSettings:
    roles: dict[str, ModelRole]
    models: dict[str, str] = field(default_factory=dict)
    device: str = "auto"
    dtype: str = "auto"
    threads: int = 0
    workers: int = 1  # with threads = 0, each worker takes cores ÷ workers threads
    max_input_tokens: int = 512
    max_batch_tokens: int = 8192
    max_new_tokens: int = 64
    memory_budget_mb: int = 4096
    offline: str = "auto"
    cache_dir: str = "~/.cache/lmbot"
    preload: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, config: Config, roles: dict[str, ModelRole]) -> WorkerSettings:
        inf = config.inference
        return cls(
            roles=dict(roles),
            models=dict(config.models),
            device=inf.device,
            dtype=inf.dtype,
            threads=inf.threads,
            workers=inf.workers,
            max_input_tokens=inf.max_input_tokens,
            max_batch_tokens=inf.max_batch_tokens,
            max_new_tokens=inf.max_new_tokens,
            memory_budget_mb=inf.memory_budget_mb,
            offline=inf.offline,
            cache_dir=os.path.expanduser(inf.cache_dir),
            preload=tuple(inf.preload),
        )
