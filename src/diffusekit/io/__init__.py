"""Run folders and safe file I/O: atomic writes (``atomic``), the safetensors + JSON checkpoint format
(``checkpoint``) and reading what a run folder holds (``runfolder``: its newest checkpoint, parsed once)."""
