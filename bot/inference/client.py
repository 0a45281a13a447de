"""The inference client a bot uses: the backend named in config.

Plugins call ``ctx.inference.submit(request)`` and await its result. The
interface and the admission rules every backend shares are in
:mod:`bot.inference.service`; the local worker processes in
:mod:`bot.inference.local`; Ray Serve in :mod:`bot.inference.ray_backend`.
The names below stay importable from here.
"""

from __future__ import annotations

from bot.config import Config
from bot.inference.local import LocalInferenceClient as LocalInferenceClient
from bot.inference.service import InferenceClient as InferenceClient
from bot.inference.service import UserInference as UserInference
from bot.topics import ModelRole


def create_client(config: Config, roles: dict[str, ModelRole]) -> InferenceClient:
    """The backend named by ``inference.backend``."""
    if config.inference.backend == "ray":
        from bot.inference.ray_backend import RayInferenceClient

        return RayInferenceClient(config, roles)
    return LocalInferenceClient(config, roles)
