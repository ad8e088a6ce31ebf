"""The gate's rules as a pure function: the verdict is the conjunction of all rules."""
import math

import pytest
from hypothesis import given, settings, strategies as st

from pipeline.config import GateConfig
from pipeline.gate.rules import Evidence, evaluate_gate

CFG = GateConfig()


def _healthy():
    return {"feature_std": 0.5, "normalized_std": 0.8, "effective_rank": 6.0}


def test_collapsed_l2_proxy_at_high_lr_names_loss_and_lr():
    ev = Evidence("run", "FINISHED", 5e-5, 1e-4, "l2_proxy",
                  {"feature_std": 1e-5, "normalized_std": 0.9, "effective_rank": 3.0},
                  True, "ab" * 32, "ab" * 32)
    verdict = evaluate_gate(ev, CFG)
    assert not verdict.approved
    text = " ".join(verdict.reasons)
    assert "final_train_loss" in text and "lr" in text and "feature_std" in text


def test_healthy_default_objective_is_approved_whatever_its_loss():
    ev = Evidence("run", "FINISHED", 1e-4, 1e-4, "vicreg", _healthy(), True, "c" * 64, "c" * 64)
    assert evaluate_gate(ev, CFG).approved


def test_running_run_and_modified_checkpoint_are_rejected():
    ev = Evidence("run", "RUNNING", 0.5, 1e-5, "vicreg", _healthy(), True, "c" * 64, "d" * 64)
    verdict = evaluate_gate(ev, CFG)
    names = {r.name for r in verdict.rules if not r.passed}
    assert names == {"run_finished", "checkpoint_intact"}


floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32),
                   st.floats(1e-7, 10.0), st.none())


@pytest.mark.property
@settings(max_examples=400, deadline=None)
@given(status=st.sampled_from(["FINISHED", "RUNNING", "FAILED", "KILLED"]), loss=floats,
       lr=st.one_of(st.sampled_from([1e-6, 1e-5, 2e-5, 1e-4, 1e-3]), st.none()),
       objective=st.sampled_from(["vicreg", "l2_proxy", None]),
       fstd=floats, nstd=floats, rank=floats, found=st.booleans(),
       tampered=st.booleans(), recorded=st.booleans())
def test_verdict_is_the_conjunction_of_the_rules(status, loss, lr, objective, fstd, nstd, rank,
                                                  found, tampered, recorded):
    sha = "e" * 64
    ev = Evidence("run", status, loss, lr, objective,
                  {"feature_std": fstd, "normalized_std": nstd, "effective_rank": rank}, found,
                  sha if recorded else None, ("f" * 64 if tampered else sha) if found else None)
    verdict = evaluate_gate(ev, CFG)

    def ok(x, floor):
        return x is not None and math.isfinite(x) and x >= floor

    strict = objective in ("l2_proxy", None)
    expected = (status == "FINISHED" and loss is not None and math.isfinite(loss)
                and (not strict or (loss >= CFG.min_final_loss and lr is not None
                                    and lr <= CFG.max_lr * (1 + 1e-9)))
                and ok(fstd, CFG.health.min_feature_std) and ok(nstd, CFG.health.min_normalized_std)
                and ok(rank, CFG.health.min_effective_rank)
                and found and recorded and not tampered)
    assert verdict.approved == expected
    assert verdict.approved == all(r.passed for r in verdict.rules)
    assert len(verdict.reasons) == sum(not r.passed for r in verdict.rules)


def test_mlflow_stored_infinity_is_not_finite():
    """MLflow's SQL store keeps inf as the largest float; the gate must still refuse it."""
    import sys

    for stored in (sys.float_info.max, -sys.float_info.max):
        ev = Evidence("run", "FINISHED", stored, 1e-6, "vicreg", _healthy(), True,
                      "c" * 64, "c" * 64)
        verdict = evaluate_gate(ev, CFG)
        assert not verdict.approved and "final_train_loss" in " ".join(verdict.reasons)
    health = {**_healthy(), "feature_std": sys.float_info.max}
    ev = Evidence("run", "FINISHED", 0.5, 1e-6, "vicreg", health, True, "c" * 64, "c" * 64)
    assert not evaluate_gate(ev, CFG).approved


@pytest.mark.parametrize("objective", ["vicreg2", "VICReg", "", "l2-proxy"])
def test_unknown_objective_is_judged_strictly(objective):
    ev = Evidence("run", "FINISHED", 5e-5, 1e-4, objective, _healthy(), True, "c" * 64, "c" * 64)
    verdict = evaluate_gate(ev, CFG)
    assert not verdict.approved
    assert {r.name for r in verdict.rules if not r.passed} == {"final_loss_min", "lr_max"}
    assert "judged strictly" in " ".join(verdict.reasons)


def test_findings_objective_is_judged_like_vicreg():
    for objective in ("vicreg", "findings"):
        ev = Evidence("run", "FINISHED", 5e-5, 1e-4, objective, _healthy(), True, "c" * 64,
                      "c" * 64)
        assert evaluate_gate(ev, CFG).approved, objective


def test_bare_checkpoint_is_judged_by_its_metadata_and_its_source_runs_verdict():
    legacy = Evidence("checkpoint", health=_healthy(), checkpoint_found=True)
    assert evaluate_gate(legacy, CFG).approved  # no metadata: its features alone
    collapsed = Evidence("checkpoint", final_train_loss=5e-5, lr=1e-4, objective="l2_proxy",
                         health=_healthy(), checkpoint_found=True)
    failed = {r.name for r in evaluate_gate(collapsed, CFG).rules if not r.passed}
    assert failed == {"final_loss_min", "lr_max"}
    rejected = Evidence("checkpoint", final_train_loss=0.7, lr=1e-5, objective="vicreg",
                        health=_healthy(), checkpoint_found=True, source_verdict="rejected")
    failed = {r.name for r in evaluate_gate(rejected, CFG).rules if not r.passed}
    assert failed == {"source_run_not_rejected"}
