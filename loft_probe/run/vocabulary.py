"""The metric vocabulary: every metric name a run directory holds, with its meaning.

The one list shared by the probe (which writes these names, through the functions of
:mod:`loft_probe.probe.measure`, each of which names the metrics it returns) and by everything that reads a run
(compare, report, diagnose). Formulas: :mod:`loft_probe.metrics` (spec: docs/metrics-spec.md).
"""

METRICS = {
    # run-level rows (layer "")
    "loss": "training loss the user (or the Trainer) reported for the step",
    "eval_loss": "held-out loss (built-in tasks)",
    "eval_loss_se": "standard error of eval_loss, std(per-example loss)/sqrt(n): how far it would move on "
                    "another held-out set of the same size (built-in classifier tasks)",
    "eval_accuracy": "held-out accuracy (built-in tasks)",
    "skipped_step": "1 when the optimizer step was skipped for non-finite gradients (the step still counts: "
                    "each call of optimizer.step() is one step of the record)",
    "trainer_clip_coefficient": "min(1, max_grad_norm / ‖g‖), ‖g‖ the global gradient norm before the HF "
                                "Trainer's clipping: the factor its clip scaled the step's gradients by (the "
                                "captured G and the shadow are unscaled)",
    "lr": "the learning rate of the step (the param group of the first probed layer; a schedule shows here)",
    "beta1": "Adam's β1 of the step (same group)",
    "beta2": "Adam's β2 of the step (same group)",
    # per layer, every recorded step. A value undefined at its input (a cosine with a zero vector, a residual
    # of G = 0, a ratio to a zero) is a missing row: NaN in a record always means training went non-finite.
    "nonfinite_grad": "1 when the layer's gradient held NaN or Inf (the shadow skipped it)",
    "grad_norm": "‖G‖, the full-weight gradient (W.grad, or the captured G of a LoRA layer)",
    "factor_grad_norm": "sqrt(‖g_A‖² + ‖g_B‖²), the LoRA factor gradients",
    "update_norm": "‖ΔW‖ of this step's effective-weight update",
    "weight_change_norm": "‖W_t − W_0‖, the cumulative change",
    "update_weight_ratio": "‖ΔW‖ / ‖W‖",
    "update_lr_ratio": "‖ΔW‖ / (lr·sqrt(m·n)) with the step's lr: ≤ K(t) (→ 7.3) for every Adam-like step, LoFT's too",
    "factor_b_change_norm": "‖B_t − B_0‖, how far the LoRA factor B has moved since attach (0: it never trained)",
    "factor_a_change_norm": "‖A_t − A_0‖, the same for A",
    "cos_update_grad": "cos(ΔW, G): −1 is steepest descent",
    "cos_moment_grad": "cos(first moment, gradient), in full space when the optimizer has one",
    "residual_left": "‖(I − P_B)·G‖ / ‖G‖: what no A-step can express",
    "residual_right": "‖G·(I − P_A)‖ / ‖G‖: what no B-step can express",
    "residual_tangent": "‖(I − P_B)·G·(I − P_A)‖ / ‖G‖: what no LoRA step can express",
    "shadow_update_cosine": "cos(ΔW, shadow update): does the step go where full fine-tuning with the run's "
                            "optimizer (AdamW for LoFT) would?",
    "shadow_update_rel_norm": "‖ΔW‖ / ‖shadow update‖",
    "shadow_m_rel_error": "‖M̂ − M_shadow‖ / ‖M_shadow‖, M̂ the optimizer's full-space first moment (a dense "
                          "weight's, LoFT's reconstruction)",
    "shadow_m_cosine": "cos(M̂, M_shadow)",
    "shadow_v_rel_error": "‖V̂ − V_shadow‖ / ‖V_shadow‖ (LoFT's reconstructed second moment)",
    "shadow_v_cosine": "cos(V̂, V_shadow)",
    "shadow_m_proj_rel_error": "‖M̂ − proj(M_shadow)‖ / ‖proj(M_shadow)‖ per factor side, the shadow projected on "
                               "what that factor expresses; M̂: LoFT's reconstruction of the factor that moved, "
                               "LoRA's factor moments lifted (both sides as one vector); GaLore: its lifted "
                               "moment against the shadow's projected onto P's subspace",
    "shadow_m_proj_cosine": "cos(M̂, proj(M_shadow)), over the same sides",
    "shadow_m_proj_cosine_b": "cos(M̂_B, M_shadow·P_A): the B side alone (M̂_B = (1/s)·m_B·(A·Aᵀ)⁺·A for LoRA)",
    "shadow_m_proj_cosine_a": "cos(M̂_A, P_B·M_shadow): the A side alone (M̂_A = (1/s)·B·(Bᵀ·B)⁺·m_A for LoRA)",
    "shadow_precond_proj_cosine": "cos of the preconditioned directions m/(sqrt(v)+ε), lifted per side, against "
                                  "the shadow's projected the same way",
    "shadow_precond_cosine": "cos of the preconditioned directions M/(sqrt(V)+ε), optimizer vs shadow",
    "galore_refresh_age": "GaLore: steps since the projector P was last refreshed (0: at this step, from this "
                          "step's G)",
    "galore_cos_before_refresh": "GaLore, at a refresh step: cos(P_old·m, G), the first moment from before the "
                                 "step read through the outgoing projector, against this step's gradient",
    "galore_cos_after_refresh": "GaLore, at a refresh step: cos(P_new·m, G) after it (the step's "
                                "cos_moment_grad): the old r coordinates are read through the new P, not moved",
    # per layer, snapshot steps
    "delta_rel_size": "‖ΔW_t‖ / ‖W_0‖ of the cumulative change",
    "delta_stable_rank": "‖ΔW_t‖² / ‖ΔW_t‖₂²",
    "delta_r90": "number of singular values holding 90% of ‖ΔW_t‖²",
    "intruders": "intruder dimensions of W_0 + ΔW_t (top 10 left singular vectors, ε = 0.5)",
}

# Metrics whose value describes the run's state at a step (an evaluation, the change since the start, a
# snapshot's spectrum) rather than the step itself: their summary is the value at the last step
# (loft_probe.run.series), every other metric's is its late value.
END_STATE = frozenset({"eval_loss", "eval_accuracy", "weight_change_norm", "factor_b_change_norm",
                       "factor_a_change_norm", "delta_rel_size", "delta_stable_rank", "delta_r90", "intruders"})
