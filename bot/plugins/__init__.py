"""Loading plugins: the built-ins in ``plugins/`` and the ``lmbot`` entry-point group.

A plugin that breaks a rule is recorded with one clear error and skipped; every
other plugin keeps working (``/plugins`` and ``lmbot plugins`` show the error).
What is checked when a plugin loads, so that mistakes show up at start-up and
not on a student's first use:

* its import and its hooks are contained: any exception, ``sys.exit()`` and
  ``KeyboardInterrupt`` included, and a time limit per plugin
  (:data:`LOAD_TIME_LIMIT_S`), so one plugin cannot stop the bot from starting;
* it does not pull torch (or another heavy ML library, :data:`HEAVY_MODULES`)
  into the bot process: models run in worker processes only;
* every hook it implements exists (a misspelt hook name would never be called);
* every :class:`~bot.inference.protocol.Request` type it defines names a task
  that exists (found without importing it), defines ``texts()`` and uses a
  registered model role;
* every command's handler takes exactly its options (checked by
  :class:`~bot.commands.Command` itself).

A plugin that claims a name already taken (a command name, or the plugin's own
name) is skipped with a load error naming the plugin that holds it: the plugins
loaded first keep theirs (the core, then the built-ins, then installed plugins
in order of their names), and one plugin cannot stop the bot from starting. The plugin options in
``[plugins.options.<plugin>]`` are checked against what each plugin declares
with ``register_options`` (:func:`check_plugin_config`).

Each job is a private module; the names below are the API:

* ``_containment``: running plugin code under guards (:func:`run_limited`) and the
  heavy-import check (:func:`heavy_import_problem`);
* ``_checks``: the static checks of the request types and worker tasks a plugin
  defines (:func:`task_problem`, :func:`request_problem`), read over ``ast``;
* ``_host``: :class:`PluginHost`, the :class:`Registry` it builds, claims on names,
  and the check of ``[plugins]`` (:func:`check_plugin_config`).

This package is the host; the built-in plugins it loads are the top-level ``plugins``
package (:data:`BUILTIN_PACKAGE`).
"""

from __future__ import annotations

from bot.plugins._checks import builtin_tasks, request_problem, request_types, task_name, task_problem
from bot.plugins._containment import (
    BUILTIN_PACKAGE,
    HEAVY_MODULES,
    LOAD_TIME_LIMIT_S,
    PluginLoadError,
    heavy_import_problem,
    run_limited,
)
from bot.plugins._host import (
    ENTRY_POINT_GROUP,
    IGNORE_ENV,
    PluginConflict,
    PluginHost,
    PluginRecord,
    Registry,
    check_plugin_config,
    entry_points,
    plugin_options,
)

__all__ = [
    "BUILTIN_PACKAGE",
    "ENTRY_POINT_GROUP",
    "HEAVY_MODULES",
    "IGNORE_ENV",
    "LOAD_TIME_LIMIT_S",
    "PluginConflict",
    "PluginHost",
    "PluginLoadError",
    "PluginRecord",
    "Registry",
    "builtin_tasks",
    "check_plugin_config",
    "entry_points",
    "heavy_import_problem",
    "plugin_options",
    "request_problem",
    "request_types",
    "run_limited",
    "task_name",
    "task_problem",
]
