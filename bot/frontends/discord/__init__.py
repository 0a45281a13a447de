"""The Discord front end: slash commands generated from the core's registry."""
