"""The cluster fault matrix: every fault case of the test suite, run once, printed as a table.

    python scripts/fault_matrix.py            # all cases (about 20 minutes on 2 CPU cores)
    python scripts/fault_matrix.py -k ddp     # the cases whose test id contains "ddp"

Each case is a test that drives the real ``train.py`` (SIGKILL / SIGTERM / SIGUSR1 at random steps, process-group
and single-rank signals under 2-rank gloo DDP, kills around saves, full disks, corrupt checkpoints, changed configs,
concurrent runs, mistyped names). The table gives, per case, what "nothing lost" requires there, what was observed
(the test's outcome and time, or its first failing assertion) and whether it passed. Exit code 1 when any case fails.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

FAULTS = "tests/runs/test_faults.py"
DDP = "tests/runs/test_ddp_faults.py"
RESUME = "tests/runs/test_resume.py"
CHANGES = "tests/runs/test_resume_changes.py"
DISK = "tests/runs/test_disk_full.py"

# (test id, case, expected)
CASES: list[tuple[str, str, str]] = [
    (f"{RESUME}::test_sigkill_mid_training_then_rerun_gives_identical_weights",
     "SIGKILL at a random step", "rerun bit-identical to uninterrupted"),
    (f"{RESUME}::test_sigterm_saves_a_checkpoint_exits_0_and_resumes",
     "SIGTERM at a step", "saved at that step, exit 0, resume bit-identical"),
    (f"{RESUME}::test_sigkill_mid_save_leaves_the_previous_checkpoint_and_the_rerun_no_temporary_file",
     "SIGKILL half-way through a save", "previous last.ckpt loads; rerun removes the temp file"),
    (f"{RESUME}::test_sigkill_with_repeated_augmentation_and_mixup_resumes_bit_identical",
     "SIGKILL, repeated aug + mixup", "rerun bit-identical"),
    (f"{RESUME}::test_two_process_sigkill_with_repeated_augmentation_resumes_bit_identical",
     "SIGKILL, 2-rank DDP", "rerun bit-identical to 2-rank run"),
    (f"{FAULTS}::test_a_signal_to_the_whole_process_group_with_workers_saves_requeues_and_resumes_exactly[SIGUSR1]",
     "kill -USR1 -PGID, 2 persistent workers", "saved, scontrol requeue, exit 0, resume bit-identical"),
    (f"{FAULTS}::test_a_signal_to_the_whole_process_group_with_workers_saves_requeues_and_resumes_exactly[SIGTERM]",
     "kill -TERM -PGID, 2 persistent workers", "saved, no requeue, exit 0, resume bit-identical"),
    (f"{DDP}::test_a_stop_signal_to_any_ranks_stops_all_at_one_step_and_resumes_exactly[sigterm-both]",
     "DDP 2 ranks: SIGTERM to both", "all stop at one step < 60 s, exit 0, resume = 2-rank reference"),
    (f"{DDP}::test_a_stop_signal_to_any_ranks_stops_all_at_one_step_and_resumes_exactly[sigterm-rank0]",
     "DDP 2 ranks: SIGTERM to rank 0 only", "all stop at one step < 60 s, exit 0, resume = reference"),
    (f"{DDP}::test_a_stop_signal_to_any_ranks_stops_all_at_one_step_and_resumes_exactly[sigterm-rank1]",
     "DDP 2 ranks: SIGTERM to rank 1 only", "all stop at one step < 60 s, exit 0, resume = reference"),
    (f"{DDP}::test_a_stop_signal_to_any_ranks_stops_all_at_one_step_and_resumes_exactly[sigusr1-rank1]",
     "DDP 2 ranks: SIGUSR1 to rank 1 only", "all stop at one step < 60 s, exit 0, resume = reference"),
    (f"{DDP}::test_a_killed_rank_ends_every_rank_within_a_minute_and_the_rerun_resumes_exactly[0]",
     "DDP 2 ranks: SIGKILL rank 0", "every rank gone < 60 s; rerun = reference"),
    (f"{DDP}::test_a_killed_rank_ends_every_rank_within_a_minute_and_the_rerun_resumes_exactly[1]",
     "DDP 2 ranks: SIGKILL rank 1", "every rank gone < 60 s; rerun = reference"),
    (f"{DDP}::test_a_stalled_rank_fails_the_job_after_the_collective_timeout_not_30_minutes",
     "DDP 2 ranks: rank 1 stalls", "job gone < 60 s (timeout 15 s); last save intact"),
    (f"{CHANGES}::test_a_signal_between_accumulated_micro_batches_waits_for_the_step_and_resumes_exactly",
     "accumulation 2, signal after an odd micro-batch", "saved after the step, resume bit-identical"),
    (f"{FAULTS}::test_a_signal_during_a_long_validation_stops_it_and_the_resumed_run_repeats_it",
     "SIGTERM during a long validation", "stops within it; resume repeats it; metrics, weights, best = ref"),
    (f"{FAULTS}::test_a_signal_during_setup_exits_0_and_requeues_on_sigusr1[SIGUSR1]",
     "SIGUSR1 during setup", "exit 0, requeued, nothing saved"),
    (f"{FAULTS}::test_a_signal_during_setup_exits_0_and_requeues_on_sigusr1[SIGTERM]",
     "SIGTERM during setup", "exit 0, no requeue, nothing saved"),
    (f"{FAULTS}::test_a_kill_around_the_epoch_end_saves_loses_no_validation_and_best_ckpt_matches_the_summary"
     "[between-best-and-last]",
     "SIGKILL between best.ckpt and last.ckpt", "no validation lost; summary best = best.ckpt = reference"),
    (f"{FAULTS}::test_a_kill_around_the_epoch_end_saves_loses_no_validation_and_best_ckpt_matches_the_summary"
     "[in-validation-after-a-periodic-save]",
     "SIGKILL in validation after a periodic save", "no validation lost; weights and best = reference"),
    (f"{DISK}::test_fit_whose_second_checkpoint_save_fills_the_disk_stops_in_one_line_and_the_rerun_resumes",
     "ENOSPC during a checkpoint save", "exit 2, one line, no temp file, rerun resumes"),
    (f"{DISK}::test_the_kernels_own_refusal_through_torch_save_is_a_disk_full_error",
     "EFBIG from the kernel (RLIMIT_FSIZE)", "one-line error, previous checkpoint intact"),
    (f"{FAULTS}::test_a_second_fit_on_a_running_runs_name_stops_at_once_naming_the_first",
     "two fits on one --name", "second exits 2 naming pid/host; first finishes"),
    (f"{CHANGES}::test_a_resume_that_changes_the_trajectory_refuses_in_one_line_and_changes_nothing[batch-size]",
     "resume with another batch size", "exit 2, one line naming the field; run untouched"),
    (f"{CHANGES}::test_a_resume_that_changes_the_trajectory_refuses_in_one_line_and_changes_nothing[ranks]",
     "resume with another rank count", "exit 2, one line naming the field; run untouched"),
    (f"{CHANGES}::test_a_resume_that_changes_the_trajectory_refuses_in_one_line_and_changes_nothing[lr]",
     "resume with another LR", "exit 2, one line naming the field; run untouched"),
    (f"{CHANGES}::test_a_resume_that_changes_only_workers_and_callbacks_continues",
     "resume with other workers/callbacks", "resumes and finishes"),
    (f"{FAULTS}::test_a_corrupt_last_ckpt_stops_fit_in_one_line_and_runs_nothing[truncated]",
     "truncated last.ckpt", "exit 2, one line"),
    (f"{FAULTS}::test_a_corrupt_last_ckpt_stops_fit_in_one_line_and_runs_nothing[empty]",
     "empty last.ckpt", "exit 2, one line"),
    (f"{FAULTS}::test_a_corrupt_last_ckpt_stops_fit_in_one_line_and_runs_nothing[random bytes]",
     "random-bytes last.ckpt", "exit 2, one line"),
    (f"{FAULTS}::test_a_corrupt_last_ckpt_stops_fit_in_one_line_and_runs_nothing[os.system pickle]",
     "last.ckpt with an os.system global", "exit 2, one line, nothing executed"),
    (f"{FAULTS}::test_a_mistyped_name_does_not_score_untrained_weights[predict]",
     "predict --name missing", "exit 2, one line listing runs"),
    (f"{FAULTS}::test_eight_slurm_tasks_starting_loggers_in_one_run_write_one_wandb_id",
     "8 SLURM tasks start loggers in one run", "one wandb id, written once"),
]  # fmt: skip


def _outcome(case: ET.Element) -> tuple[str, bool]:
    seconds = float(case.get("time", 0.0))
    for tag in ("failure", "error"):
        problem = case.find(tag)
        if problem is not None:
            message = (problem.get("message") or problem.text or tag).strip().splitlines()[0]
            return f"{tag}: {message[:90]}", False
    if case.find("skipped") is not None:
        return f"skipped: {(case.find('skipped').get('message') or '')[:80]}", False
    return f"as expected ({seconds:.0f} s)", True


def _test_id(case: ET.Element) -> str:
    path = case.get("classname", "").replace(".", "/") + ".py"
    return f"{path}::{case.get('name')}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-k", default="", help="only the cases whose test id contains this text")
    args = parser.parse_args()
    cases = [case for case in CASES if args.k in case[0]]
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "faults.xml"
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "slow or not slow"]
        command += [f"--junitxml={report}", *(case[0] for case in cases)]
        started = time.monotonic()
        subprocess.run(command, cwd=REPO, env={**os.environ, "PYTHONWARNINGS": "ignore"}, check=False)
        minutes = (time.monotonic() - started) / 60
        results = {_test_id(case): _outcome(case) for case in ET.parse(report).getroot().iter("testcase")}
    rows = [(case, expected, *results.get(test_id, ("not run", False))) for test_id, case, expected in cases]
    widths = [max(len(str(row[i])) for row in rows) for i in range(3)]
    header = ("case", "expected", "observed")
    print()
    print(" | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " | pass")
    print("-|-".join("-" * w for w in widths) + "-|-----")
    for case, expected, observed, passed in rows:
        cells = (case, expected, observed)
        print(" | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + f" | {'yes' if passed else 'NO'}")
    failed = sum(not row[3] for row in rows)
    print(f"\n{len(rows) - failed}/{len(rows)} cases passed in {minutes:.1f} min")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
