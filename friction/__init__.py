"""The mixture-of-friction library (config, data formats, tokens, modeling, attention, the Hub) and the `friction`
command; the DVC stages that use it are the `stages` package."""
