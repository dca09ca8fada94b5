"""Named protocols: presets of the settings that decide what Algorithm 1 is compared on.

- ``paper``: the paper as written. Validation = the class-balanced subset of the *training* set, beta from
  {0.1, 0.5, 1, 10} chosen on it, App. B's rule in its per-sample reading, the paper's fine-tuning schedule (images:
  whole network, 5 epochs, lr 1e-4, batch 128; feature files: classifier re-training), and the influence over the
  parameters that fine-tuning moves (images: the whole network but batch norm, Gauss-Newton + CG, the stable stand-in
  for the paper's LiSSA on a non-convex network; feature files: the classifier).
- ``recommended``: what the measurements here support for a practitioner. A validation set held out of training
  (12 images per class for digits, 10 otherwise), beta = 0 (the control itself) among the candidates so the choice
  can never be worse than the control on validation, and influence scope = fine-tuned scope = the classifier (exact
  solve on the frozen features). The energy term is left unbounded (``energy_cap="none"``): with 0 among the betas,
  a beta whose energy term hurts loses on validation instead of being clipped to the control's behaviour.

Any option given with a protocol replaces its preset value.
"""
from __future__ import annotations

from iaerf.pipeline.settings import PROTOCOLS, SettingError

__all__ = ["protocol_settings"]


def protocol_settings(name: str, dataset: str) -> dict:
    """The flat settings ``name`` ("paper" or "recommended") sets for ``dataset``."""
    if name not in PROTOCOLS:
        raise SettingError("protocol", f"protocol must be one of {PROTOCOLS}, got {name!r}")
    features = dataset == "features"
    if name == "paper":
        out = dict(heldout_val=0, validation="train_subset", betas=(0.1, 0.5, 1.0, 10.0), energy_cap="per_sample",
                   finetune_epochs=None, finetune_batch_size=None, finetune_lr=None, finetune_params="auto",
                   influence_params="finetuned")
        if not features:
            out.update(gauss_newton=True, solver="cg", solver_options=None)
        return out
    return dict(heldout_val=12 if dataset == "digits" else 10, validation="heldout", betas=(0.0, 0.1, 0.5, 1.0, 10.0),
                energy_cap="none", finetune_params=("fc",), influence_params="finetuned", solver="exact",
                solver_options=None)
