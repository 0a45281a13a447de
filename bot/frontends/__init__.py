"""The front ends: each turns what a person does into :meth:`bot.app.App.execute` calls.

* :mod:`bot.frontends.discord`: the Discord client (command schema and sync, the command loop
  and its watchdog, rendering within Discord's limits, log redaction, lifecycle);
* :mod:`bot.frontends.console`: the interactive console (``lmbot console``);
* :mod:`bot.frontends.ask`: ``lmbot ask``, and the warm lmbot that keeps models loaded between asks;
* :mod:`bot.frontends.cli`: the ``lmbot`` command and every subcommand.

None imports torch; like the rest of the bot side, they reach models only through the
inference service.
"""
