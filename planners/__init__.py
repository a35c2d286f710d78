"""orthonet stage: fingerprint and plans.

``fingerprint`` (what the data looks like) -> ``planner`` / ``resenc_planner`` (per-view plans, chosen by name in
``registry``; topology rules in ``topology``, memory estimate in ``memory``, network entries in ``network_spec``)
-> ``plans`` (reading/writing/checking plans files) ; ``transfer`` reuses another dataset's topology; ``cli`` is
``ortho_plan_and_preprocess``. Kept import-light: worker processes import ``orthonet.planners.fingerprint``.
"""
