"""The GPU check (issue 20 item 5): without CUDA it says so in one line and exits non-zero; --dry-run runs the same
stages on the CPU at tiny size and writes its JSON and report."""
import json

import pytest
import torch

from minialign import gpu_check, methods


def test_without_cuda_one_line_and_nonzero_exit(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--out", "unused"]) == 2
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "no CUDA device" in out[0]


@pytest.mark.notebook  # it executes notebook 06 (smoke profile): out of the inner loop
def test_dry_run_runs_every_stage_on_the_cpu(tmp_path):
    """The bench in all four settings (bf16/fp32 x UNet checkpointing) on the tiny pipeline and notebook 06 (smoke
    profile, one method, one SFT-PG cycle) on SD 1.5's architecture at width 32, random weights."""
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["dry_run"] and not report["skipped"]
    assert [b["setting"] for b in report["bench"]] == ["bf16", "bf16+ckpt", "fp32", "fp32+ckpt"]
    for b in report["bench"]:
        assert {r["method"] for r in b["rows"]} >= {"nograd", "full_bp_ckpt", "draft_1"}
    nb = report["notebook_06"]
    exact = methods.EXACT_CHECKPOINTED  # the one method the dry run trains
    assert nb["error"] is None and f"{exact}_reward_after" in nb["metrics"] and "sft_pg_after_mmd" in nb["metrics"]
    assert "## bench, fp32+ckpt" in (tmp_path / "gpu_check.md").read_text()


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="sd15_dir"):
        gpu_check.run(tmp_path, dry_run=True, sd15_dir=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="budget"):
        gpu_check.run(tmp_path, dry_run=True, budget=0)
