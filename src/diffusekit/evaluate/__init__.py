"""Metrics only: the project's feature network (``features``), sample quality (``quality``, ``samples``),
Inception FID from a local weights file (``fid``), likelihood baselines (``baselines``), the diffusion
metrics of ``diffusekit evaluate`` (``diffusion``) and its figures (``figures``)."""
