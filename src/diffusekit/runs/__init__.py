"""Orchestration over a run folder: sample it (``sample``), restore images with it (``restore``) and
evaluate it (``evaluate``), with the files each leaves. Model-specific work is the family's
(``diffusekit.families``); this layer checks the request and the destination, calls the family, and
writes outputs that are complete or absent."""
