"""minialign.kit.results: the claims table's rules on hand-made metrics, missing notebooks, the loader."""
import json

import pytest
from scipy.stats import ttest_ind

from minialign.kit import results
def _seeds(key, mean, n=5, spread=0.01):
    """Per-seed values of one recorded result (the keys measure/arena_report.to_metrics writes), mean +- spread."""
    return {f"{key}_s{i}": mean + spread * (i - (n - 1) / 2) for i in range(n)}


GOOD = {
    "01_sft_pg": {"swd_after_over_many_step": 0.9, "swd_after_over_floor": 1.1},
    "03_rlr": {**_seeds("arena_rlr_final", 0.6), **_seeds("arena_draft_1_final", 0.5), **_seeds("arena_alignprop_final", 0.4),
               **_seeds("arena_ddpo_final", 0.1), **_seeds("ablation_full", -0.1), **_seeds("ablation_without_ho", -0.2),
               **_seeds("ablation_without_zo", -0.3), **_seeds("ablation_fo_only", -0.4)},
    "04_sdo": {**_seeds("arena_digit_plus_one_sdo_final", 0.5), **_seeds("arena_digit_plus_one_full_bp_final", 0.5)},
    "bench": {"flops_vs_full_bp_sdo": 0.1, "time_vs_full_bp_sdo": 0.2, "saved_vs_full_bp_sdo": 0.03},
    "05_shortft": {k: v for t in ("digit3_tempered", "digit_plus_one") for m, mean in (("shortft", 0.3), ("draft_lv", 0.1))
                   for k, v in _seeds(f"arena_{t}_{m}_final", mean).items()},
}


def _verdicts(metrics):
    return {r["paper"].split()[0]: r["verdict"] for r in results.claims(metrics)}


def test_claims_reproduced_when_every_rule_holds():
    assert _verdicts(GOOD) == {"SFT-PG": "reproduced", "RLR": "reproduced", "SDO": "reproduced", "ShortFT": "reproduced"}
    assert all(r["score"] == 1.0 for r in results.claims(GOOD))


def test_claims_partly_and_not():
    m = json.loads(json.dumps(GOOD))
    m["bench"]["flops_vs_full_bp_sdo"] = 0.35                          # cheaper, but not 90% cheaper: partly
    m["03_rlr"].update(_seeds("arena_rlr_final", 0.05))                # below every baseline ...
    m["03_rlr"].update(_seeds("ablation_full", -0.5))                  # ... and the worst ablation: not
    m["05_shortft"].update(_seeds("arena_digit_plus_one_shortft_final", 0.1, spread=0.2))  # a tie is not a win: partly
    v = _verdicts(m)
    assert v["SDO"] == "partly" and v["RLR"] == "not" and v["ShortFT"] == "partly"
    scores = {r["paper"].split()[0]: r["score"] for r in results.claims(m)}
    assert scores["SDO"] == 0.5 and scores["RLR"] == 0.0
    # means alone would call these wins: a 0.02 lead with a seed spread of 0.3 is no win by the rule
    m["03_rlr"].update(_seeds("arena_rlr_final", 0.52, spread=0.3))
    assert "RLR ~ DRaFT-1" in results.claims(m)[1]["measured"]
    # one seed per method gives no interval: not measured, never a verdict from means
    one = {"05_shortft": {"arena_symmetry_shortft_final_s0": 0.9, "arena_symmetry_draft_lv_final_s0": 0.1}}
    assert results.claims(one)[3]["verdict"] == "not measured"


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
    (tmp_path / "04_sdo.json").write_text(json.dumps({"arena_digit_plus_one_sdo_final": 0.3}))
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

    def seeds(nb, key):
        got = {int(k.rsplit("_s", 1)[1]): v for k, v in m.get(nb, {}).items()
               if k.startswith(key + "_s") and k.rsplit("_s", 1)[1].isdigit()}
        return [got[i] for i in sorted(got)]

    def welch(nb, a_key, b_key):  # scipy's Welch interval, apart from measure/stats.compare
        a, b = seeds(nb, a_key), seeds(nb, b_key)
        if min(len(a), len(b)) < 2:
            return None
        ci = ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
        return "a" if ci.low > 0 else "b" if ci.high < 0 else "tie"

    def wins(*args):
        v = welch(*args)
        return None if v is None else v == "a"

    arena = [wins("03_rlr", "arena_rlr_final", f"arena_{b}_final") for b in ("draft_1", "alignprop", "ddpo")]
    abl = [wins("03_rlr", "ablation_full", f"ablation_{k}") for k in ("without_ho", "without_zo", "fo_only")]
    sdo = welch("04_sdo", "arena_digit_plus_one_sdo_final", "arena_digit_plus_one_full_bp_final")
    tasks = {k.split("_shortft_final_s")[0][len("arena_"):] for k in m.get("05_shortft", {}) if "_shortft_final_s" in k}
    return {
        "SFT-PG": judge([at_most("01_sft_pg", "swd_after_over_many_step", 1.1),
                         at_most("01_sft_pg", "swd_after_over_floor", 1.2)]),
        "RLR": judge(arena + abl),
        "SDO": judge([at_most("bench", "flops_vs_full_bp_sdo", 0.15), at_most("bench", "saved_vs_full_bp_sdo", 0.15),
                      None if sdo is None else sdo != "b"]),
        "ShortFT": judge([wins("05_shortft", f"arena_{t}_shortft_final", f"arena_{t}_draft_lv_final")
                          for t in sorted(tasks) if seeds("05_shortft", f"arena_{t}_draft_lv_final")]),
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
