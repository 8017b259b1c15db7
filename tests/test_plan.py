"""Plan schema: round trip, exact bit accounting, and every rejection with a clear message."""
import json

import pytest

from wqedge import blocks
from wqedge.alloc.uniform import model_bits, uniform_plan
from wqedge.plan import Plan, PlanError
from wqedge.spec import ModelSpec

SPEC = ModelSpec(hidden_size=640, n_layers=2, n_heads=10, n_kv_heads=2, head_dim=64, intermediate_size=1700,
                 vocab_size=100)


def mixed_plan(group=256):
    linears = SPEC.linears()
    plan = uniform_plan(linears, group, 16.0)
    for i, t in enumerate(plan.tensors):  # every action somewhere, some protected columns
        t.actions = [blocks.ACTION_NAMES[(i + c) % len(blocks.ACTION_NAMES)] for c in range(len(t.actions))]
        t.protected[0] = [0, 3]
    plan.validate(SPEC)
    return plan


def test_round_trip_preserves_everything(tmp_path):
    plan = mixed_plan()
    path = plan.save(tmp_path / "p.json")
    back = Plan.load(path, SPEC)
    assert back.to_dict() == plan.to_dict()
    assert back.effective_bits() == pytest.approx(plan.effective_bits(), rel=0, abs=0)


def test_ragged_chunks_counted_exactly():
    # hidden 640 with G=256 -> chunks 256, 256, 128; intermediate 1700 -> ..., 164 (padded to 192 in codes)
    plan = uniform_plan(SPEC.linears(), 256, 4.5, action="q4")
    t = plan.tensor("model.layers.0.mlp.down_proj.weight")
    assert t.widths(256) == [256] * 6 + [164]
    expect = sum(8 * t.out_features * (4 + blocks.padded(g) // 2) for g in t.widths(256))
    assert t.bits(256) == expect
    assert plan.effective_bits() == pytest.approx(model_bits(SPEC.linears(), 256, "q4"))


def test_uniform_picks_most_precise_action_within_budget():
    linears = SPEC.linears()
    q4 = model_bits(linears, 128, "q4")  # above 4.25: the ragged last chunks pad to 32 columns
    assert q4 > 4.25
    assert uniform_plan(linears, 128, q4).action_histogram().keys() == {"q4"}
    # just under: full 128-column chunks stay q4 (judged per chunk width), the ragged ones (1700 = 13 x 128
    # + 36) take the best action the rest of the budget buys; the old whole-model rule made everything q3
    p = uniform_plan(linears, 128, q4 - 1e-6)
    for t in p.tensors:
        assert all(a == "q4" for a in t.actions[: t.in_features // 128]), t.actions
        assert t.in_features % 128 == 0 or t.actions[-1] != "q4"
    assert p.effective_bits() <= q4 - 1e-6 and p.meta["uniform"]["by_width"]["36"] in ("q4c", "q3", "q2")
    assert uniform_plan(linears, 128, 1.8).action_histogram().keys() == {"ternary"}


@pytest.mark.parametrize("budget,match", [(1.0, "below the cheapest"), (16.5, "above keeping every weight in fp16")])
def test_infeasible_budget_rejected(budget, match):
    with pytest.raises(PlanError, match=match):
        uniform_plan(SPEC.linears(), 128, budget)


def _edit(tmp_path, plan, fn):
    d = plan.to_dict()
    fn(d)
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(d))
    return p


@pytest.mark.parametrize("mutate,match", [
    (lambda d: d.update(version=5), "unsupported plan version 5"),
    (lambda d: d.update(format="other"), "not a wqedge plan"),
    (lambda d: d["tensors"][0]["actions"].__setitem__(0, "q5"), "unknown action 'q5'"),
    (lambda d: d["tensors"][0]["methods"].__setitem__(0, "gptq"), "unknown quantizer method"),
    (lambda d: d["tensors"][0]["actions"].pop(), "make 3 chunks"),
    (lambda d: d["tensors"][0].update(name="model.layers.9.self_attn.q_proj.weight"), "not a decoder linear"),
    (lambda d: d["tensors"].pop(), "no actions for 1 linears"),
    (lambda d: d["tensors"][0].update(protected=[[300], [], []]), "protected columns"),
    (lambda d: d.update(budget_bits=2.0), "does not meet its budget"),
    (lambda d: d.pop("tensors"), "malformed plan"),
])
def test_rejections_name_the_problem(tmp_path, mutate, match):
    path = _edit(tmp_path, mixed_plan(), mutate)
    with pytest.raises(PlanError, match=match) as e:
        Plan.load(path, SPEC)
    assert str(path) in str(e.value)


def test_fingerprint_mismatch_rejected(tmp_path):
    plan = mixed_plan()
    plan.model_fingerprint = "a" * 64
    path = plan.save(tmp_path / "p.json")
    with pytest.raises(PlanError, match="different model"):
        Plan.load(path, SPEC, fingerprint="b" * 64)


def test_not_json_rejected(tmp_path):
    p = tmp_path / "x.json"
    p.write_text("{not json")
    with pytest.raises(PlanError, match="not valid JSON"):
        Plan.load(p)
