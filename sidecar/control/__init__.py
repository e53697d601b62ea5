"""The control surface: the admin console (session, language, command tables) and the stats
reporter. Reads the data plane; nothing in the data plane imports it."""
