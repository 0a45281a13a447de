"""The worker side of the process boundary: the only code that may import torch.

Everything here runs in a model worker (a local worker process started by
:mod:`bot.inference.local`, or a Ray Serve replica deployed by
:mod:`bot.inference.ray_backend`), never in the bot process:

* :mod:`bot.worker.process`: the local worker's main loop and :func:`~bot.worker.process.run_batch`,
  which both transports run (checks inputs, runs a task, checks its results are plain data);
* :mod:`bot.worker.tasks`: the built-in tasks and the helpers a plugin's own task may use
  (its ``__all__`` is that API);
* :mod:`bot.worker.loading`: loads a role's model under a memory budget (``ModelCache``);
* :mod:`bot.worker.engines`: the verified ONNX Runtime engine for causal LMs;
* :mod:`bot.worker.ray_replica`: a Ray Serve replica of one role.

The bot process only *names* this code (the local transport's spawn target, the Ray
replica class); ``tests/test_layout.py`` checks that no bot-side module imports it
otherwise, and that no bot-side module imports torch or another heavy library at all.
This package's ``__init__`` stays empty of imports, so naming a module here loads nothing heavy.
"""
