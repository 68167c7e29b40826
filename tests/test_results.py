"""minialign.kit.results: the claims table's rules on hand-made metrics, missing notebooks, the loader."""
import json

import pytest

from minialign.kit import results
GOOD = {
    "01_sft_pg": {"swd_after_over_many_step": 0.9, "swd_after_over_floor": 1.1},
    "03_rlr": {"arena_rlr_final": 0.6, "arena_draft_1_final": 0.5, "arena_alignprop_final": 0.4, "arena_ddpo_final": 0.1,
               "ablation_full": -0.1, "ablation_without_ho": -0.2, "ablation_without_zo": -0.3, "ablation_fo_only": -0.4},
    "04_sdo": {"param_reward_sdo": 0.5, "param_reward_full_bp": 0.5, "param_reward_full_bp_std": 0.01},
    "bench": {"flops_vs_full_bp_sdo": 0.1, "time_vs_full_bp_sdo": 0.2, "saved_vs_full_bp_sdo": 0.03},
    "05_shortft": {f"reward_gain_equal_compute_{t}_{m}": v for t in ("digit3_tempered", "symmetry", "ring_centre")
                   for m, v in (("shortft", 0.3), ("draft_lv", 0.1))},
}


def _verdicts(metrics):
    return {r["paper"].split()[0]: r["verdict"] for r in results.claims(metrics)}


def test_claims_reproduced_when_every_rule_holds():
    assert _verdicts(GOOD) == {"SFT-PG": "reproduced", "RLR": "reproduced", "SDO": "reproduced", "ShortFT": "reproduced"}
    assert all(r["score"] == 1.0 for r in results.claims(GOOD))


def test_claims_partly_and_not():
    m = json.loads(json.dumps(GOOD))
    m["bench"]["flops_vs_full_bp_sdo"] = 0.35                         # cheaper, but not 90% cheaper: partly
    m["03_rlr"].update(arena_rlr_final=0.05, ablation_full=-0.5)      # below every baseline, worst ablation: not
    m["05_shortft"]["reward_gain_equal_compute_symmetry_shortft"] = 0.1  # a tie is not a win: partly
    v = _verdicts(m)
    assert v["SDO"] == "partly" and v["RLR"] == "not" and v["ShortFT"] == "partly"
    scores = {r["paper"].split()[0]: r["score"] for r in results.claims(m)}
    assert scores["SDO"] == 0.5 and scores["RLR"] == 0.0


def test_missing_metrics_say_not_measured():
    rows = results.claims({"04_sdo": {"time_ratio_vs_full_bp": 0.1}})
    assert [r["verdict"] for r in rows] == ["not measured"] * 4
    assert all(r["score"] is None for r in rows)
    assert results.gather({}) == {}


def test_verdict_rule_and_its_errors():
    assert [results.verdict(p, 3) for p in (3, 1, 0)] == ["reproduced", "partly", "not"]
    with pytest.raises(ValueError, match="total=0"):
        results.verdict(0, 0)


def test_gather_reads_the_first_source_and_converts_bytes(tmp_path):
    (tmp_path / "02_reward_gradients.json").write_text(json.dumps(
        {"full_bp_saved_bytes_per_step": 2**21, "arena_digit3_tempered_refl_final": 0.7,
         "arena_digit3_tempered_refl_std": 0.01}))
    (tmp_path / "04_sdo.json").write_text(json.dumps({"param_reward_sdo": 0.3}))
    bench = tmp_path / "measured" / "bench.json"
    bench.parent.mkdir()
    bench.write_text(json.dumps({"rows": [{"method": "sdo", "time_vs_full_bp": 0.3, "flops_vs_full_bp": 0.2}]}))
    t = results.gather({**results.load_metrics(tmp_path, bench=False), results.BENCH: results.load_bench(bench)})
    assert t["saved_mb_per_step"]["full_bp"].value == 2.0
    assert t["reward_digit3_tempered"]["refl"] == (0.7, 0.01, "02_reward_gradients: arena_digit3_tempered_refl_final")
    assert t["time_vs_full_bp"]["sdo"].source == "bench: time_vs_full_bp_sdo"  # one cost source: the bench run
    assert t["flops_vs_full_bp"]["sdo"].value == 0.2
    assert set(results.load_metrics(tmp_path, bench=False)) == {"02_reward_gradients", "04_sdo"}


def _rule_verdicts(m):
    """The four verdicts recomputed from the raw metrics by the rules as each row states them (an oracle written
    apart from results.claims): every sub-check holds -> reproduced, some -> partly, none -> not, one missing ->
    not measured."""
    def judge(checks):
        if not checks or any(c is None for c in checks):
            return "not measured"
        return "reproduced" if all(checks) else ("partly" if any(checks) else "not")

    def at_most(nb, key, bound):
        v = m.get(nb, {}).get(key)
        return None if v is None else v <= bound

    rlr = m.get("03_rlr", {})
    arena = [None if "arena_rlr_final" not in rlr or f"arena_{b}_final" not in rlr
             else rlr["arena_rlr_final"] > rlr[f"arena_{b}_final"] for b in ("draft_1", "alignprop", "ddpo")]
    abl = [rlr.get(f"ablation_{k}") for k in ("full", "without_ho", "without_zo", "fo_only")]
    sdo = m.get("04_sdo", {})
    rs, rf = sdo.get("param_reward_sdo"), sdo.get("param_reward_full_bp")
    sh = m.get("05_shortft", {})
    pre = "reward_gain_equal_compute_"
    tasks = {k[len(pre):].rsplit("_", 1)[0] for k in sh if k.startswith(pre) and k.endswith("_shortft")}
    return {
        "SFT-PG": judge([at_most("01_sft_pg", "swd_after_over_many_step", 1.1),
                         at_most("01_sft_pg", "swd_after_over_floor", 1.2)]),
        "RLR": judge(arena + [None if None in abl else abl[0] >= max(abl[1:])]),
        "SDO": judge([at_most("bench", "flops_vs_full_bp_sdo", 0.15), at_most("bench", "saved_vs_full_bp_sdo", 0.15),
                      None if None in (rs, rf) else rs >= rf - sdo.get("param_reward_full_bp_std", 0.0)]),
        "ShortFT": judge([sh[f"{pre}{t}_shortft"] > sh[f"{pre}{t}_draft_lv"] + 1e-3
                          for t in sorted(tasks) if f"{pre}{t}_draft_lv" in sh]),
    }


@pytest.mark.parametrize("metrics", [GOOD, "committed"], ids=["hand-made", "committed"])
def test_verdicts_follow_the_stated_rules(metrics):
    """Each claim's verdict on the committed metrics (notebooks/metrics) and on hand-made ones equals the rule's,
    recomputed here from the raw numbers; and its "measured" column lists as many sub-checks as the rule has, with
    the yes/no count that gives the verdict."""
    m = results.load_metrics() if metrics == "committed" else metrics
    rows = results.claims(m)
    assert _verdicts(m) == _rule_verdicts(m)
    for r in rows:
        if r["verdict"] != "not measured":
            yes, no = r["measured"].count("(yes)"), r["measured"].count("(no)")
            assert results.verdict(yes, yes + no) == r["verdict"] and r["score"] == results.SCORE[r["verdict"]], r
