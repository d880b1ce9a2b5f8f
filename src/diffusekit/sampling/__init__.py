"""Stateless samplers over the one denoiser convention, with explicit grids and per-sample seeds.

- ``catalog``: the torch-free table of sampler, grid, spacing and restoration names.
- ``settings``: ``SampleSettings``, the one sampling-settings type, and ``parse_seeds`` (torch-free).
- ``generate``: ``generate`` (batched over seeds, dispatched through the catalog) and ``TrajectoryRecorder``.
- ``ddpm`` (ancestral sampling), ``ddim`` (DDIM and its inversion), ``grids`` (discrete timestep grids).
- ``ode`` (Euler, Heun, adaptive RK45 on the probability-flow ODE; time grids), ``dpm_solver``
  (DPM-Solver++(2M)), ``unipc`` (UniPC), ``stochastic`` (the reverse SDE, predictor-corrector, annealed Langevin).
- ``noise`` (``PerSampleNoise``: sample i depends only on seed i).
- ``guidance`` (classifier-free guidance as a denoiser wrapper), ``restore`` (degradation operators,
  RePaint and DDNM).

The package imports nothing itself, so that the torch-free modules stay torch-free: import the module you
need (``from diffusekit.sampling.ddpm import sample_ddpm``).
"""
